"""Two reference measurements, taken on this machine in the same run as the service, to tell how fast it is.

The benchmark's targets were set on a machine where one SDK chat call costs about 1.0 ms of CPU in-process and a
bare Flask route answers about 7,000 req/s. Machines that run the benchmark differ by more than two times in speed
(docs/benchmark.md), so the table shows both beside the service's own numbers.
"""

import time

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
