// POST /generate with fetch (Node 18 or newer, or a browser page on an origin listed in CORS_ORIGINS).
//   GENAPI_KEY=... node examples/generate.mjs ["your prompt"]
const url = process.env.GENAPI_URL ?? "http://127.0.0.1:8000";
const prompt = process.argv[2] ?? "Tell me a joke.";

const response = await fetch(`${url}/generate`, {
  method: "POST",
  headers: { "Content-Type": "application/json", "X-API-KEY": process.env.GENAPI_KEY },
  body: JSON.stringify({ prompt, max_tokens: 50 }),
});
const answer = await response.json();
if (!response.ok) {
  // Every error has this shape: message, type, param, code.
  console.error(`${response.status} ${answer.error.code}: ${answer.error.message}`);
  process.exit(1);
}
console.log(answer.response);
console.log(`(${answer.model}, ${answer.usage.total_tokens} tokens, request ${answer.id})`);
