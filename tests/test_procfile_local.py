"""The Procfile run locally as README says: honcho, the virtual environment on PATH, .env.example copied to .env,
and the port honcho gives (PORT), not one the settings pin."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import USER_KEY
from tests.procfile import ROOT, free_port


def wait_for_generate(url: str, process: subprocess.Popen, log: Path, seconds: float = 90) -> dict:
    """The first 200 from POST /generate; generous, since a busy machine may take many seconds to start gunicorn."""
    request = urllib.request.Request(
        f"{url}/generate", data=json.dumps({"prompt": "hello"}).encode(),
        headers={"Content-Type": "application/json", "X-API-KEY": USER_KEY},
    )  # fmt: skip
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"honcho exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except OSError:
            time.sleep(0.2)  # polling for the server to listen: there is no event to wait on
    raise AssertionError(f"no answer on {url} within {seconds} s:\n{log.read_text()}")


def test_honcho_serves_the_procfile_on_the_port_it_gives_with_env_example_as_dotenv(tmp_path, fake_openai):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        (ROOT / ".env.example").read_text()
        + f"API_KEYS=alice:{USER_KEY}\nOPENAI_API_KEY=sk-local\nOPENAI_BASE_URL={fake_openai.base_url}\n"
    )
    venv_bin = Path(sys.executable).parent
    port = free_port()
    environment = {"PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "PORT": str(port)}
    log = tmp_path / "honcho.log"
    with open(log, "wb") as output:
        honcho = subprocess.Popen(
            [str(venv_bin / "honcho"), "start", "--env", str(dotenv), "--procfile", str(ROOT / "Procfile"), "web"],
            cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            answer = wait_for_generate(f"http://127.0.0.1:{port}", honcho, log)
            assert answer["model"] == "gpt-4o-mini"  # .env.example's OPENAI_MODEL, as the fake upstream echoes it
        finally:
            os.killpg(honcho.pid, signal.SIGTERM)
            try:
                honcho.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
