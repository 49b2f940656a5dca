// A user with daily_request_limit 1: the second call is refused with 429 and
// x-should-retry: false, which the SDK at its default retries must raise at once rather than
// sleep for Retry-After (the rest of the day) or retry.
import { run, describeError } from './common.mjs';

const GIVE_UP_MS = 10_000; // well past the test's bound of 2 s, well short of its timeout
const body = { model: 'demo', messages: [{ role: 'user', content: 'hi' }] };

await run(async (openai) => {
  const first = await openai.chat.completions.create(body);
  const started = performance.now();
  let timer;
  const gaveUp = new Promise((resolve) => {
    timer = setTimeout(() => resolve('still waiting'), GIVE_UP_MS);
  });
  let refused = null;
  let outcome;
  try {
    outcome = await Promise.race([
      openai.chat.completions.create(body).then(() => 'answered'),
      gaveUp,
    ]);
  } catch (err) {
    outcome = 'refused';
    refused = describeError(err);
  }
  clearTimeout(timer);
  return {
    first: first.choices[0].message.content,
    max_retries: openai.maxRetries,
    outcome, // "refused", or "answered" or "still waiting" (a sleep before a retry)
    seconds: (performance.now() - started) / 1000,
    refused,
  };
});
process.exit(); // with the exit code run() set; abandons a retry the SDK may be sleeping for
