// genapi's OpenAI-compatible /v1 with the official openai npm package: a streamed chat completion.
//   npm install openai
//   GENAPI_KEY=... node examples/chat.mjs ["your prompt"]
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.GENAPI_URL ?? "http://127.0.0.1:8000"}/v1`,
  apiKey: process.env.GENAPI_KEY,
});
const prompt = process.argv[2] ?? "Tell me a joke.";

try {
  const models = await client.models.list();
  const model = models.data[0].id; // the first model this key may use
  // The package throws if the stream is cut, so a short text is never taken for a whole one.
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: prompt }],
    max_tokens: 50,
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    if (chunk.choices.length) process.stdout.write(chunk.choices[0].delta.content ?? "");
    else if (chunk.usage) console.log(`\n(${chunk.usage.total_tokens} tokens)`);
  }
} catch (error) {
  // genapi's errors arrive as the package's own classes (RateLimitError, ...), with status and code.
  console.error(`${error.status} ${error.code}: ${error.message}`);
  process.exit(1);
}
