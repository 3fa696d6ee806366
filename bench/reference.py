"""Two reference measurements, taken on this machine in the same run as the service, to tell how fast it is.

The benchmark's targets were set on a machine where one SDK chat call costs about 1.0 ms of CPU in-process and a
bare Flask route answers about 7,000 req/s. Machines that run the benchmark differ by more than two times in speed
(docs/benchmark.md), so the table shows both beside the service's own numbers.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import openai
from flask import Flask

TARGET_MACHINE_SDK_CALL_CPU_MS = 1.0
TARGET_MACHINE_BARE_FLASK_RPS = 7000

# gunicorn serves this the way the Procfile serves genapi (the same worker class and count), without genapi.
app = Flask(__name__)


@app.post("/")
def hello():
    return "Hello, World!"


def sdk_call_cpu_ms(base_url: str, calls: int = 2000) -> float:
    """CPU time of one synchronous SDK chat call in this process, against an upstream that answers at once."""
    client = openai.OpenAI(api_key="sk-reference", base_url=base_url, max_retries=0)

    def call():
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)

    for _ in range(calls // 10):  # warm: the connection, the SDK's lazily built types
        call()
    started = time.process_time()
    for _ in range(calls):
        call()
    cpu_ms = (time.process_time() - started) * 1000 / calls
    client.close()
    return cpu_ms


def sdk_stream_chunk_cpu_ms(base_url: str, streams: int = 100, concurrency: int = 50) -> tuple[float, int]:
    """(CPU ms per chunk, chunks) of the SDK consuming streamed completions in this process, `concurrency` at a time.

    The streaming upstream paces its chunks (bench/stream_upstream.py), so each arrives on its own, as a relay gets
    them; the streams run in threads, as a program that holds several at once with the synchronous SDK does.
    """
    client = openai.OpenAI(api_key="sk-reference", base_url=base_url, max_retries=0)

    def consume(_: int) -> int:
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=50, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        return sum(1 for _ in stream)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(consume, range(concurrency)))  # warm: the connections, the SDK's lazily built types
        started = time.process_time()
        chunks = sum(pool.map(consume, range(streams)))
        cpu = time.process_time() - started
    client.close()
    if not chunks:
        raise SystemExit(f"the SDK's {streams} streams from {base_url} brought no chunk: is the streaming upstream up?")
    return cpu * 1000 / chunks, chunks
