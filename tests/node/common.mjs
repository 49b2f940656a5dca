// Shared by the scripts that tests/test_node_sdk.py runs: a client for the gateway named by
// GATEWAY_BASE_URL (ending in /v1) and GATEWAY_API_KEY, at the SDK's default retries and
// timeout, that records each HTTP request it sends; and one JSON line of results on stdout.
import OpenAI from 'openai';

export const sent = []; // {method, url, body} of each HTTP request, retries included

function recordingFetch(url, init = {}) {
  let body = null;
  if (typeof init.body === 'string') {
    try {
      body = JSON.parse(init.body);
    } catch {
      body = init.body;
    }
  }
  sent.push({ method: init.method ?? 'GET', url: String(url), body });
  return fetch(url, init);
}

export function client() {
  const baseURL = process.env.GATEWAY_BASE_URL;
  const apiKey = process.env.GATEWAY_API_KEY;
  if (!baseURL || !apiKey) throw new Error('set GATEWAY_BASE_URL and GATEWAY_API_KEY');
  return new OpenAI({ baseURL, apiKey, fetch: recordingFetch }); // default retries
}

export function describeError(err) {
  const headers = {};
  if (err?.headers && typeof err.headers.forEach === 'function') {
    err.headers.forEach((value, name) => (headers[name] = value));
  } else if (err?.headers) {
    Object.assign(headers, err.headers);
  }
  return {
    class: err?.constructor?.name ?? typeof err,
    message: String(err?.message ?? err),
    status: err?.status ?? null,
    headers,
    isAPIError: err instanceof OpenAI.APIError,
    isRateLimitError: err instanceof OpenAI.RateLimitError,
  };
}

// Runs main(), prints its result as JSON; any uncaught error becomes {"error": …}, exit 1.
export async function run(main) {
  try {
    const result = await main(client());
    process.stdout.write(JSON.stringify({ ...result, sent }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: describeError(err), sent }) + '\n');
    process.exitCode = 1;
  }
}
