"""End to end against a real OpenAI-compatible model server (llama.cpp's llama-server with a 135M model).

It sits beside the clone at ../shared/real-upstream (GENAPI_REAL_UPSTREAM overrides the path of its `serve`);
where it is absent the tests skip and say so. The model's reported name is the server's own: not asserted.
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx2
import openai
import pytest

from tests.conftest import USER_KEY
from tests.procfile import ROOT, ProcfileService, free_port

SERVE = Path(os.environ.get("GENAPI_REAL_UPSTREAM", ROOT.parent / "shared" / "real-upstream" / "serve"))
MESSAGES = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture(scope="module")
def real_upstream():
    """The real model server on a free port, for this module; skips where it is not installed."""
    if not SERVE.exists():
        pytest.skip(f"no real model server at {SERVE} (set GENAPI_REAL_UPSTREAM to its `serve` script)")
    port = free_port()
    process = subprocess.Popen([str(SERVE), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the real model server at {SERVE} did not start")
            time.sleep(0.2)  # it loads its model: there is no event to wait on
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def service(real_upstream, tmp_path_factory):
    environment = {
        "API_KEYS": f"alice:{USER_KEY}", "OPENAI_BASE_URL": real_upstream, "OPENAI_MODEL": "smollm2",
        "OPENAI_API_KEY": "no-key-needed-here",
    }
    service = ProcfileService(environment, tmp_path_factory.mktemp("real") / "web.log")
    service.wait_until_healthy()
    yield service
    service.terminate()


@pytest.fixture
def sdk(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=USER_KEY, max_retries=0, timeout=60)


def test_generate_answers_from_the_real_model(service):
    response = httpx2.post(f"{service.url}/generate", json={"prompt": "Name one colour.", "max_tokens": 16},
                           headers={"X-API-KEY": USER_KEY}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"] and body["usage"]["completion_tokens"] >= 1


def test_generate_streams_from_the_real_model(service):
    with httpx2.stream("POST", f"{service.url}/generate", timeout=60, headers={"X-API-KEY": USER_KEY},
                       json={"prompt": "Name one colour.", "max_tokens": 16, "stream": True}) as response:
        assert response.status_code == 200
        events, name = [], None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events[-1][0] == "done" and any(name == "delta" for name, _ in events)
    usage = events[-1][1]["usage"]
    assert usage["completion_tokens"] >= 1 and "estimated" not in usage


def test_sdk_completes_a_chat_through_genapi_from_the_real_model(sdk):
    completion = sdk.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16)
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens >= 1


def test_sdk_streams_a_chat_through_genapi_from_the_real_model(sdk):
    chunks = list(sdk.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
