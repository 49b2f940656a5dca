// client.chat.completions.stream(): the helper that needs a role in the first delta.
import { run } from './common.mjs';

await run(async (openai) => {
  const stream = openai.chat.completions.stream({
    model: 'demo',
    messages: [{ role: 'user', content: 'ping from node' }],
  });
  const deltas = [];
  for await (const chunk of stream) {
    const piece = chunk.choices[0]?.delta?.content;
    if (piece) deltas.push(piece);
  }
  const completion = await stream.finalChatCompletion();
  const choice = completion.choices[0];
  return { message: choice.message, finish_reason: choice.finish_reason, deltas };
});
