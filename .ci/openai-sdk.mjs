// genapi's /v1, driven by the official `openai` npm package as any Node client would: streamed and not, with usage,
// and its error classes. Usage: node .ci/openai-sdk.mjs BASE_URL API_KEY MODEL
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseUrl, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseUrl}/v1`, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Tell me a joke." }];

async function check(name, body) {
    await body();
    console.log(`  ok  ${name}`);
}

async function refusedWith(errorClass, status, call) {
    await assert.rejects(call, (error) => error instanceof errorClass && error.status === status);
}

await check("models lists the model", async () => {
    const models = [];
    for await (const entry of client.models.list()) models.push(entry.id);
    assert.ok(models.includes(model), models.join(", "));
});

await check("a chat completion, with usage", async () => {
    const completion = await client.chat.completions.create({ model, messages });
    assert.equal(typeof completion.choices[0].message.content, "string");
    assert.ok(completion.choices[0].message.content.length > 0);
    const usage = completion.usage;
    assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
});

await check("a streamed chat completion, with usage", async () => {
    const stream = await client.chat.completions.create({
        model, messages, stream: true, stream_options: { include_usage: true },
    });
    let text = "";
    let usage = null;
    for await (const chunk of stream) {
        text += chunk.choices[0]?.delta?.content ?? "";
        usage = chunk.usage ?? usage;
    }
    assert.ok(text.length > 0);
    assert.ok(usage && usage.completion_tokens > 0);
});

await check("a wrong key is PermissionDeniedError", () =>
    refusedWith(OpenAI.PermissionDeniedError, 403, () =>
        new OpenAI({ baseURL: `${baseUrl}/v1`, apiKey: "not-a-key", maxRetries: 0 }).chat.completions.create({ model, messages })));

await check("a model the key may not use is NotFoundError", () =>
    refusedWith(OpenAI.NotFoundError, 404, () => client.chat.completions.create({ model: "no-such-model", messages })));

await check("n other than 1 is UnprocessableEntityError", () =>
    refusedWith(OpenAI.UnprocessableEntityError, 422, () => client.chat.completions.create({ model, messages, n: 2 })));

console.log("openai-sdk: /v1 passed");
