// client.responses.create() and client.responses.stream().
import { run } from './common.mjs';

await run(async (openai) => {
  const created = await openai.responses.create({ model: 'demo', input: 'hello responses' });
  const stream = openai.responses.stream({ model: 'demo', input: 'hello stream' });
  const types = [];
  let deltas = '';
  for await (const event of stream) {
    types.push(event.type);
    if (event.type === 'response.output_text.delta') deltas += event.delta;
  }
  const final = await stream.finalResponse();
  return {
    created: { status: created.status, output_text: created.output_text, usage: created.usage },
    streamed: {
      status: final.status,
      output_text: final.output_text,
      usage: final.usage,
      deltas,
      types,
    },
  };
});
