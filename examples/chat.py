"""genapi's OpenAI-compatible /v1 with the official openai SDK: a chat completion, then the same streamed.

    GENAPI_KEY=... .venv/bin/python examples/chat.py ["your prompt"]

Nothing here is genapi's own: any code written for OpenAI works with base_url=<genapi>/v1 and a genapi key.
"""

import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ.get("GENAPI_URL", "http://127.0.0.1:8000") + "/v1",
                       api_key=os.environ["GENAPI_KEY"])
prompt = sys.argv[1] if len(sys.argv) > 1 else "Tell me a joke."
model = next(iter(client.models.list())).id  # the first model this key may use
messages = [{"role": "user", "content": prompt}]

try:
    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=50)
    print(completion.choices[0].message.content)
    print(f"({completion.model}, {completion.usage.total_tokens} tokens)")

    # Streamed: the SDK raises if the stream is cut, so a short text is never taken for a whole one.
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=50, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n({chunk.usage.total_tokens} tokens)")
except openai.APIStatusError as error:  # genapi's errors arrive as the SDK's own classes: RateLimitError, ...
    raise SystemExit(f"{error.status_code} {error.code}: {error.message}")
