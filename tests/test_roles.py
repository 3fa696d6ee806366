"""Admin keys: admin-only endpoints, any model for admins, named entries, and `flask create-key`."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flask import jsonify

from config import load_settings
from genapi.auth import require_admin
from genapi.keys import KeyRing
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.procfile import ROOT


@pytest.fixture
def ops_client(make_app):
    """An app with a test-only admin endpoint, standing in for /metrics."""
    app = make_app()
    app.add_url_rule("/ops", view_func=require_admin(lambda: jsonify(secret="ops data")), endpoint="ops")
    return app.test_client()


def test_a_user_key_cannot_reach_an_admin_only_endpoint(ops_client):
    response = ops_client.get("/ops", headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "admin_only"


def test_an_admin_key_reaches_an_admin_only_endpoint(ops_client):
    response = ops_client.get("/ops", headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 200
    assert response.get_json() == {"secret": "ops data"}


def test_an_admin_only_endpoint_without_a_key_is_401_and_with_a_wrong_key_403(ops_client):
    assert ops_client.get("/ops").status_code == 401
    response = ops_client.get("/ops", headers={"X-API-KEY": "guess"})
    assert (response.status_code, response.get_json()["error"]["code"]) == (403, "invalid_api_key")


def test_a_user_key_cannot_use_a_model_outside_allowed_models(make_app, upstream):
    client = make_app(allowed_models="test-model").test_client()
    response = client.post("/generate", json={"prompt": "hi", "model": "gpt-5"}, headers={"X-API-KEY": USER_KEY})
    assert response.get_json()["error"]["code"] == "model_not_allowed"
    assert upstream.calls == 0


def test_an_admin_key_may_use_any_model(make_app, upstream):
    client = make_app(allowed_models="test-model").test_client()
    response = client.post("/generate", json={"prompt": "hi", "model": "gpt-5"}, headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 200
    assert response.get_json()["model"] == "gpt-5"


def test_admin_keys_take_named_and_hashed_entries(make_app):
    digest = hashlib.sha256(b"ops-key").hexdigest()
    client = make_app(admin_api_keys=f"ops:sha256:{digest}").test_client()
    assert client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": "ops-key"}).status_code == 200


def test_admin_keys_alone_are_enough_to_start(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("ADMIN_API_KEYS", "root:k")
    assert load_settings(_env_file=None).admin_api_keys.get_secret_value() == "root:k"


def test_a_malformed_admin_entry_stops_start_up_naming_admin_api_keys(monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("ADMIN_API_KEYS", "sha256:abc")
    with pytest.raises(SystemExit):
        load_settings(_env_file=None)
    assert "ADMIN_API_KEYS:" in capsys.readouterr().err


def test_create_key_prints_a_new_key_and_a_hashed_entry_that_accepts_it(app):
    result = app.test_cli_runner().invoke(args=["create-key", "carol"])
    assert result.exit_code == 0
    key = result.output.split("key:")[1].split()[0]
    entry = result.output.split("entry:")[1].split()[0]
    assert len(key) >= 40
    assert entry.startswith("carol:sha256:") and key not in entry
    assert KeyRing([entry]).identify(key).name == "carol"
    assert "API_KEYS" in result.output


def test_create_key_makes_a_different_key_each_time(app):
    runner = app.test_cli_runner()
    outputs = {runner.invoke(args=["create-key", "dave"]).output for _ in range(2)}
    assert len(outputs) == 2


def test_create_key_admin_says_to_add_it_to_admin_api_keys(app):
    result = app.test_cli_runner().invoke(args=["create-key", "root2", "--admin"])
    assert "ADMIN_API_KEYS" in result.output


def test_create_key_refuses_a_name_that_would_break_the_entry(app):
    result = app.test_cli_runner().invoke(args=["create-key", "a:b"])
    assert result.exit_code != 0
    assert "NAME" in result.output


def test_create_key_runs_from_the_flask_command_before_any_key_is_set(tmp_path):
    """The first key is made with a real model configured and no API_KEYS yet, which a server would refuse."""
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OPENAI_API_KEY": "sk-not-used"}
    flask = Path(sys.executable).parent / "flask"
    result = subprocess.run(
        [str(flask), "--app", "app", "create-key", "first"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "entry: first:sha256:" in result.stdout


@pytest.mark.parametrize("upstream_key", ["sk-not-used", None], ids=["real model", "mock provider"])
def test_create_key_prints_only_the_key_and_the_entry_on_stdout_and_no_warning_about_keys(tmp_path, upstream_key):
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    if upstream_key:
        environment["OPENAI_API_KEY"] = upstream_key
    flask = Path(sys.executable).parent / "flask"
    result = subprocess.run(
        [str(flask), "--app", "app", "create-key", "alice"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["key", "entry"]
    assert "API_KEYS" in result.stderr  # the advice: where the entry goes
    assert "refused" not in result.stderr and "development keys" not in result.stderr


def test_flask_run_without_client_keys_refuses_to_start_like_gunicorn(tmp_path):
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OPENAI_API_KEY": "sk-not-used"}
    flask = Path(sys.executable).parent / "flask"
    result = subprocess.run(
        [str(flask), "--app", "app", "run", "--port", "1"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "never runs open" in result.stderr
