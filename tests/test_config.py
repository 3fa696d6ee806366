"""Settings: environment over .env, clear start-up errors, the retry budget, the provider default, never open."""

import json
import os
import re
from pathlib import Path

import pytest

from config import Settings, load_settings, worst_case_upstream_seconds

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Run in an empty folder with none of genapi's variables set."""
    monkeypatch.chdir(tmp_path)
    # A copy, so that what load_settings writes (the mock's one-time key) goes when the test does.
    environment = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    monkeypatch.setattr(os, "environ", environment)
    return tmp_path


def start_up_error(capsys, **overrides) -> str:
    with pytest.raises(SystemExit):
        load_settings(**overrides)
    return capsys.readouterr().err


def test_environment_wins_over_dotenv(clean_env, monkeypatch):
    (clean_env / ".env").write_text("OPENAI_MODEL=from-dotenv\nMAX_TOKENS_LIMIT=77\nAPI_KEYS=k\n")
    monkeypatch.setenv("OPENAI_MODEL", "from-environment")
    settings = load_settings()
    assert settings.openai_model == "from-environment"
    assert settings.max_tokens_limit == 77


def test_wrong_value_stops_start_up_naming_the_variable(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("MAX_TOKENS_LIMIT", "lots")
    assert "MAX_TOKENS_LIMIT" in start_up_error(capsys)


def test_bad_base_url_stops_start_up(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:11434")
    assert "OPENAI_BASE_URL" in start_up_error(capsys)


def test_retries_that_cannot_fit_herokus_30_seconds_stop_start_up(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("OPENAI_TIMEOUT", "20")
    monkeypatch.setenv("OPENAI_MAX_RETRIES", "2")
    assert "30 s router limit" in start_up_error(capsys)


def test_default_timeouts_fit_the_budget():
    defaults = Settings.model_fields
    assert worst_case_upstream_seconds(defaults["openai_timeout"].default, defaults["openai_max_retries"].default) <= 25


def test_provider_defaults_to_openai_when_a_key_is_set(clean_env, monkeypatch):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert load_settings().llm_provider == "openai"


def test_provider_defaults_to_mock_without_a_key(clean_env, monkeypatch):
    monkeypatch.setenv("API_KEYS", "k")
    assert load_settings().llm_provider == "mock"


def test_openai_provider_without_client_keys_refuses_to_start(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    error = start_up_error(capsys)
    assert "never runs open" in error
    assert "API_KEYS" in error


def test_mock_provider_without_client_keys_makes_one_key_and_prints_it_once(clean_env, monkeypatch, capsys):
    settings = load_settings()
    key = settings.api_keys.get_secret_value()
    assert len(key) >= 32
    assert capsys.readouterr().err.count(key) == 1
    # gunicorn's workers load the settings again after the fork; they must find the same key, and not print it.
    assert load_settings().api_keys.get_secret_value() == key
    assert key not in capsys.readouterr().err


def test_settings_repr_hides_secrets(clean_env):
    settings = Settings(api_keys="client-secret-1", openai_api_key="sk-secret-2")
    assert "client-secret-1" not in repr(settings)
    assert "sk-secret-2" not in repr(settings)


def test_start_up_error_never_shows_a_secret(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "name:sha256:not-hex-but-secret")
    error = start_up_error(capsys)
    assert "API_KEYS" in error
    assert "not-hex-but-secret" not in error


@pytest.mark.parametrize(
    "server, in_flight",
    [({"worker_class": "gevent", "worker_connections": 250}, 250), ({"worker_class": "gthread", "threads": 8}, 8),
     ({"worker_class": "sync"}, 1)],
    ids=["gevent", "gthread", "sync"],
)
def test_in_flight_requests_per_worker_follow_the_worker_class(clean_env, server, in_flight):
    settings = Settings(_env_file=None, api_keys="k", llm_provider="mock", **server)
    assert settings.in_flight_per_worker == in_flight


@pytest.mark.parametrize(
    "variable, url, password",
    [("REDIS_URL", "redis://:secret-pw@localhost:notaport/0", "secret-pw"),
     ("OPENAI_BASE_URL", "https://user:url-secret@proxy.example/v1", "url-secret"),
     ("DATABASE_URL", "mysql://user:db-secret@db.example/genapi", "db-secret")],
    ids=["redis port that is not a number", "base url that holds a password", "database of another kind"],
)
def test_a_wrong_url_stops_start_up_naming_it_without_showing_its_password(
    clean_env, monkeypatch, capsys, variable, url, password
):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv(variable, url)
    error = start_up_error(capsys)
    assert variable in error
    assert password not in error


def test_env_example_copied_to_dotenv_starts_with_the_defaults(clean_env, monkeypatch):
    (clean_env / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.setenv("API_KEYS", "k")
    settings = load_settings()
    derived = {"api_keys", "llm_provider"}
    for name, field in Settings.model_fields.items():
        if name not in derived:
            assert getattr(settings, name) == field.default, name
    assert settings.llm_provider == "mock"


def test_every_setting_is_in_the_readme_env_example_and_app_json():
    variables = {name.upper() for name in Settings.model_fields}
    readme = (ROOT / "README.md").read_text()
    configuration = readme[readme.index("## Configuration") : readme.index("**Keys.**")]
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", configuration, re.MULTILINE)) == variables
    assert set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE)) == variables
    # Heroku sets PORT itself.
    assert set(json.loads((ROOT / "app.json").read_text())["env"]) == variables - {"PORT"}


def test_api_keys_of_only_commas_and_spaces_count_as_no_key(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", " , ")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert "never runs open" in start_up_error(capsys)
