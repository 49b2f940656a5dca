// client.chat.completions.create() with a function tool: the demo calls it with arguments
// that match its parameter schema.
import { run } from './common.mjs';

const parameters = {
  type: 'object',
  properties: {
    city: { type: 'string', description: 'City name' },
    days: { type: 'integer', minimum: 3 },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    hourly: { type: 'boolean' },
  },
  required: ['city', 'days', 'unit'],
  additionalProperties: false,
};

await run(async (openai) => {
  const completion = await openai.chat.completions.create({
    model: 'demo',
    messages: [{ role: 'user', content: 'Weather in Paris for the next days?' }],
    tools: [
      {
        type: 'function',
        function: { name: 'get_forecast', description: 'A weather forecast', parameters },
      },
    ],
  });
  const choice = completion.choices[0];
  return { parameters, finish_reason: choice.finish_reason, message: choice.message };
});
