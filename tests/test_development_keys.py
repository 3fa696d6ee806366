"""A fresh clone on the mock provider, served from the Procfile twice: the development keys it printed and wrote
to .env at the first start still work after a restart."""

import json
import shutil
import urllib.error
import urllib.request

from tests.procfile import ROOT, ProcfileService

PROJECT_FILES = ["app.py", "config.py", "gunicorn.conf.py", "Procfile", "genapi", "migrations", "alembic.ini"]


def dotenv_keys(directory) -> dict:
    lines = (directory / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def status(url: str, key: str, path: str = "/generate") -> int:
    data = json.dumps({"prompt": "hello"}).encode() if path == "/generate" else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", "X-API-KEY": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_restart_keeps_the_development_keys_written_to_dotenv(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, clone / name)
    for start in ("first", "second"):
        service = ProcfileService({}, tmp_path / f"{start}.log", cwd=clone)
        try:
            service.wait_until_healthy()
            keys = dotenv_keys(clone)
            client_key = keys["API_KEYS"].removeprefix("dev:")
            admin_key = keys["ADMIN_API_KEYS"].removeprefix("dev-admin:")
            if start == "first":
                first = keys
                assert client_key in service.output() and admin_key in service.output()
            else:
                assert keys == first
                assert client_key not in service.output()  # nothing new was made, so nothing is printed
            assert status(service.url, client_key) == 200
            assert status(service.url, admin_key, "/metrics") == 200
        finally:
            service.terminate()
