"""The README's "Keys and usage" commands, run as written against the Procfile's service."""

import os
import re
import subprocess
import sys

from tests.procfile import ROOT


def readme_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- keys-and-usage -->") :]
    return re.search(r"```sh\n(.*?)```", section, re.DOTALL)[1]


def test_the_readme_keys_and_usage_commands_work(start_fake_openai, start_procfile_service, tmp_path):
    database = f"sqlite:///{tmp_path}/readme.sqlite3"
    service = start_procfile_service(start_fake_openai().base_url, DATABASE_URL=database)
    script = readme_block().replace("http://127.0.0.1:8000", service.url)
    environment = {
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": database,
    }
    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    out = finished.stdout
    assert '"response"' in out  # the team's request was answered
    assert re.search(r'"key_name":\s*"team-a"', out) and re.search(r'"requests":\s*1\b', out)  # its own usage
    assert "key_name,key_id,model,requests,prompt_tokens,completion_tokens,total_tokens\nteam-a," in out
    assert '"code":"key_revoked"' in out.replace(" ", "")
    assert '"action": "key.revoked"' in out and '"actor": "ops"' in out
