// client.embeddings.create(): at the SDK's default (it asks for base64 and decodes the
// float32 itself), with encoding_format "float", and each input alone (to check the order).
import { run } from './common.mjs';

const input = ['a', 'b', 'c'];
const vectors = (response) =>
  response.data.map((d) => ({ index: d.index, embedding: Array.from(d.embedding) }));

await run(async (openai) => {
  const byDefault = await openai.embeddings.create({ input, model: 'demo' });
  const asFloats = await openai.embeddings.create({ input, model: 'demo', encoding_format: 'float' });
  const singles = [];
  for (const one of input) {
    const alone = await openai.embeddings.create({
      input: [one],
      model: 'demo',
      encoding_format: 'float',
    });
    singles.push(vectors(alone));
  }
  return { default: vectors(byDefault), float: vectors(asFloats), singles, usage: byDefault.usage };
});
