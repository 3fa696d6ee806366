"""Settings: environment over .env, clear start-up errors, the retry budget, the provider default, never open."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from config import DEVELOPMENT_SETTINGS, Settings, load_settings, worst_case_upstream_seconds
from genapi.require_python import require_python

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


def development_keys(settings) -> tuple[str, str]:
    return settings.api_keys.get_secret_value(), settings.admin_api_keys.get_secret_value()


def restart(monkeypatch) -> None:
    """A new process: what the last one put in its environment is gone, .env stays."""
    for variable in ("API_KEYS", "ADMIN_API_KEYS", "ADMIN_RATE_LIMIT", *DEVELOPMENT_SETTINGS):
        monkeypatch.delenv(variable, raising=False)


def test_mock_provider_without_keys_makes_a_client_and_an_admin_key_and_prints_them(clean_env, capsys):
    client_key, admin_key = development_keys(load_settings())
    assert client_key.startswith("dev:") and admin_key.startswith("dev-admin:")
    printed = capsys.readouterr().err
    assert client_key.removeprefix("dev:") in printed
    assert admin_key.removeprefix("dev-admin:") in printed


def test_development_keys_are_written_to_dotenv_and_a_restart_keeps_them(clean_env, monkeypatch, capsys):
    first = development_keys(load_settings())
    restart(monkeypatch)
    assert development_keys(load_settings()) == first
    dotenv = (clean_env / ".env").read_text()
    assert dotenv.count(first[0]) == 1 and dotenv.count(first[1]) == 1


def test_workers_forked_after_the_master_find_its_development_keys_without_writing_again(clean_env, capsys):
    first = development_keys(load_settings())
    capsys.readouterr()
    assert development_keys(load_settings()) == first
    assert capsys.readouterr().err == ""
    assert (clean_env / ".env").read_text().count("API_KEYS=dev:") == 1


def test_development_keys_are_appended_to_an_env_example_copy_and_win_over_its_empty_lines(clean_env, monkeypatch):
    (clean_env / ".env").write_text((ROOT / ".env.example").read_text())
    first = development_keys(load_settings())
    restart(monkeypatch)
    assert development_keys(load_settings()) == first


def test_the_development_admin_key_is_not_rate_limited_unless_admin_rate_limit_says_so(clean_env, monkeypatch):
    assert load_settings().admin_rate_limit == "none"
    restart(monkeypatch)
    (clean_env / ".env").unlink()
    monkeypatch.setenv("ADMIN_RATE_LIMIT", "5/minute")
    assert load_settings().admin_rate_limit == "5/minute"


def test_a_development_server_lets_the_contract_tools_through_and_shows_budgets(clean_env, monkeypatch):
    settings = load_settings()
    assert settings.auth_failure_limit == settings.invalid_request_limit == "10000/minute"
    assert str(settings.token_budget) == "1000000/day"
    restart(monkeypatch)
    assert str(load_settings().token_budget) == "1000000/day"  # from .env, after a restart


def test_development_settings_leave_what_the_developer_set(clean_env, monkeypatch):
    monkeypatch.setenv("AUTH_FAILURE_LIMIT", "5/minute")
    settings = load_settings()
    assert settings.auth_failure_limit == "5/minute" and settings.invalid_request_limit == "10000/minute"
    assert "AUTH_FAILURE_LIMIT" not in (clean_env / ".env").read_text()


def test_only_admin_keys_on_the_mock_provider_still_get_a_development_client_key(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("ADMIN_API_KEYS", "ops:my-admin-key")
    settings = load_settings()
    assert settings.api_keys.get_secret_value().startswith("dev:")
    assert settings.admin_api_keys.get_secret_value() == "ops:my-admin-key"
    assert "admin key" not in capsys.readouterr().err


def test_own_client_keys_on_the_mock_provider_write_nothing(clean_env, monkeypatch):
    monkeypatch.setenv("API_KEYS", "alice:her-key")
    assert load_settings().admin_api_keys.get_secret_value() == ""
    assert not (clean_env / ".env").exists()


def test_only_admin_keys_with_a_real_model_start_and_say_only_admins_are_accepted(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("ADMIN_API_KEYS", "ops:my-admin-key")
    assert load_settings().api_keys.get_secret_value() == ""
    assert "only admin keys" in capsys.readouterr().err
    assert not (clean_env / ".env").exists()


def test_a_command_line_tool_makes_no_development_keys(clean_env):
    assert load_settings(serving=False).api_keys.get_secret_value() == ""
    assert not (clean_env / ".env").exists()


def test_an_older_python_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        require_python((3, 10, 13, "final", 0))
    assert re.fullmatch(r"genapi needs Python 3\.11 or newer; this is Python 3\.10 \(.+\)\.", str(stopped.value))
    require_python((3, 11, 0, "final", 0))  # no exit


@pytest.mark.parametrize("version", ["3.10", "3.9", "2.7"])
def test_an_older_interpreter_running_the_run_commands_first_step_gets_one_line(version):
    # pyenv's own builds first: its shims answer only for the versions selected in the current directory.
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
    interpreter = found[0] if found else shutil.which(f"python{version}")
    if interpreter and ".pyenv/shims" in str(interpreter):
        interpreter = None
    if interpreter is None:
        pytest.skip(f"no Python {version} on this machine (pyenv install {version})")
    run = subprocess.run([str(interpreter), "-m", "genapi.require_python"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and "genapi needs Python 3.11 or newer" in run.stderr


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


def test_every_setting_is_in_the_configuration_page_env_example_and_app_json():
    variables = {name.upper() for name in Settings.model_fields}
    configuration = (ROOT / "docs" / "configuration.md").read_text()  # the README links it
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", configuration, re.MULTILINE)) == variables
    # PORT is given by whatever starts the process (Heroku, honcho, `heroku local`): .env.example only explains it.
    env_example = (ROOT / ".env.example").read_text()
    assert set(re.findall(r"^([A-Z_]+)=", env_example, re.MULTILINE)) == variables - {"PORT"}
    assert re.search(r"^# PORT\b", env_example, re.MULTILINE)
    assert set(json.loads((ROOT / "app.json").read_text())["env"]) == variables - {"PORT"}


def test_api_keys_of_only_commas_and_spaces_count_as_no_key(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", " , ")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert "never runs open" in start_up_error(capsys)


@pytest.mark.parametrize("entry", ["alice:clé-secrète-123", "bob:key with spaces", "tab\tkey"])
def test_a_key_no_client_could_send_stops_start_up_without_showing_it(monkeypatch, capsys, entry):
    monkeypatch.setenv("API_KEYS", entry)
    with pytest.raises(SystemExit):
        load_settings(_env_file=None)
    error = capsys.readouterr().err
    assert "API_KEYS:" in error and "ASCII" in error
    assert entry.split(":")[-1] not in error


def test_app_json_is_a_heroku_manifest_that_the_readmes_deploy_button_points_at():
    manifest = json.loads((ROOT / "app.json").read_text())
    assert {"name", "description", "repository", "env", "buildpacks", "formation"} <= set(manifest)
    button = re.search(r"\]\(https://heroku\.com/deploy\?template=(\S+?)\)", (ROOT / "README.md").read_text())
    assert button and button.group(1) == manifest["repository"]
    for variable, entry in manifest["env"].items():
        assert entry["description"], variable
        # Heroku asks for every variable that has no value, no generator and is not marked optional.
        assert "value" in entry or "generator" in entry or entry.get("required") is False, variable
        assert isinstance(entry.get("value", ""), str), variable


def test_the_readmes_run_command_checks_the_python_version_before_pip():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- run-command -->") :]
    command = block[block.index("```sh\n") + 6 : block.index("\n```", block.index("```sh\n"))]
    assert command.startswith("python3 -m genapi.require_python && python3 -m venv .venv && ")
    assert "requirements.txt" in command and "requirements-speedups.txt" not in command
    assert "gunicorn-h1c" not in (ROOT / "requirements.txt").read_text()  # built from source: needs a C compiler
