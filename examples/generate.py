"""POST /generate with httpx: one prompt in, the model's text out; an error answer raises, with its message.

    pip install httpx
    GENAPI_KEY=... .venv/bin/python examples/generate.py ["your prompt"]
"""

import os
import sys

import httpx


def generate(prompt: str, max_tokens: int = 50) -> dict:
    url = os.environ.get("GENAPI_URL", "http://127.0.0.1:8000")
    response = httpx.post(
        f"{url}/generate",
        json={"prompt": prompt, "max_tokens": max_tokens},
        headers={"X-API-KEY": os.environ["GENAPI_KEY"]},
        timeout=30,  # genapi answers within Heroku's 30 s, whatever the model does
    )
    if response.is_error:
        error = response.json()["error"]  # every error has this shape: message, type, param, code
        raise SystemExit(f"{response.status_code} {error['code']}: {error['message']}")
    return response.json()


if __name__ == "__main__":
    answer = generate(sys.argv[1] if len(sys.argv) > 1 else "Tell me a joke.")
    print(answer["response"])
    print(f"({answer['model']}, {answer['usage']['total_tokens']} tokens, request {answer['id']})")
