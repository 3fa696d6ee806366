"""Start the service exactly as Heroku does: the Procfile's web line, with PORT set, in a real process."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_web_command() -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return shlex.split(line.removeprefix("web:"))
    raise AssertionError("the Procfile has no web line")


class ProcfileService:
    """The web process, its port, and everything it printed (in a file, so a full pipe can never block it)."""

    def __init__(self, env: dict, log_path: Path, port: int | None = None, cwd: Path = ROOT):
        self.port = port or free_port()
        self.log_path = log_path
        # The venv's bin first, as on a dyno, so `gunicorn` is the one installed beside this Python.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        environment = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "PORT": str(self.port)} | env
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            procfile_web_command(), cwd=cwd, env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_healthy(self, seconds: float = 90) -> None:
        """Until /healthz answers 200; generous, since a busy machine may take many seconds to start gunicorn."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the service did not become healthy:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, wait: float = 30) -> int:
        """SIGTERM, as Heroku sends it; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
