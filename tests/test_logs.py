"""Logs: one JSON line per request on stdout, with no key, and prompts only with LOG_PROMPTS=true."""

import json

import httpx2
import pytest

from genapi.logs import effective_configuration
from tests.conftest import UPSTREAM_KEY, USER_KEY, make_settings
from tests.fake_openai import completion_body
from tests.test_upstream import drop

REQUEST_LINE_FIELDS = {
    "time", "level", "request_id", "key_name", "method", "path", "status", "duration_ms", "upstream_ms",
    "prompt_tokens", "completion_tokens", "cached", "upstream_request_id",
}


def request_lines(capsys) -> list[dict]:
    """The request log lines written to stdout so far; every stdout line must be JSON."""
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return [line for line in lines if line["logger"] == "genapi.request"]


@pytest.fixture
def quiet(capsys):
    """Start the test with nothing captured, so only its own requests' lines are read."""
    capsys.readouterr()
    return capsys


def test_each_request_writes_one_json_line_with_every_field(generate, upstream, quiet):
    upstream.then(lambda request: httpx2.Response(
        200, json=completion_body(json.loads(request.content), 1), headers={"x-request-id": "req_test_1"}
    ))
    response = generate(headers={"X-Request-ID": "trace-42"})
    [line] = request_lines(quiet)
    assert REQUEST_LINE_FIELDS <= set(line)
    body = response.get_json()
    assert line["request_id"] == "trace-42"
    assert line["key_name"] == "alice"
    assert (line["method"], line["path"], line["status"], line["level"]) == ("POST", "/generate", 200, "INFO")
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == body["usage"]["completion_tokens"]
    assert line["cached"] is False
    assert line["upstream_request_id"] == "req_test_1"
    assert line["duration_ms"] >= line["upstream_ms"] >= 0


def test_unauthenticated_request_logs_a_null_key_name(client, quiet):
    client.post("/generate", json={"prompt": "x"})
    [line] = request_lines(quiet)
    assert line["status"] == 401
    assert line["key_name"] is None
    assert line["upstream_ms"] is None


def test_no_key_or_prompt_or_output_is_logged_by_default(client, generate, quiet):
    generate(prompt="my secret prompt")
    client.post("/generate?api_key=" + USER_KEY, json={"prompt": "my secret prompt"})
    client.post("/generate", json={"prompt": "x"}, headers={"X-API-KEY": USER_KEY + "-wrong"})
    output = quiet.readouterr().out
    assert output.count('"logger": "genapi.request"') == 3
    for secret in (USER_KEY, UPSTREAM_KEY, "my secret prompt", "echo:"):
        assert secret not in output


def test_prompt_and_output_are_logged_with_log_prompts_true(make_app, quiet):
    client = make_app(log_prompts=True).test_client()
    client.post("/generate", json={"prompt": "Tell me a joke."}, headers={"X-API-KEY": USER_KEY})
    [line] = request_lines(quiet)
    assert line["prompt"] == "Tell me a joke."
    assert line["output"] == "echo: Tell me a joke."
    assert USER_KEY not in json.dumps(line)


def test_a_cached_answer_is_logged_with_its_prompt_and_output_with_log_prompts_true(make_app, quiet):
    client = make_app(log_prompts=True, cache_ttl=60).test_client()
    for _ in range(2):
        client.post("/generate", json={"prompt": "Tell me a joke."}, headers={"X-API-KEY": USER_KEY})
    first, second = request_lines(quiet)
    assert second["cached"] is True
    assert (second["prompt"], second["output"]) == (first["prompt"], first["output"]) == (
        "Tell me a joke.", "echo: Tell me a joke.")


def test_a_batch_is_logged_with_each_prompt_and_output_with_log_prompts_true(make_app, quiet):
    client = make_app(log_prompts=True).test_client()
    client.post("/generate/batch", json={"prompts": ["one", "two"], "system": "Be brief."}, headers={"X-API-KEY": USER_KEY})
    [line] = request_lines(quiet)
    assert line["prompt"] == ["one", "two"]
    assert line["system"] == "Be brief."
    assert line["output"] == ["echo: one", "echo: two"]


def test_a_failed_call_is_logged_with_its_prompt_and_no_output_with_log_prompts_true(make_app, upstream, quiet):
    client = make_app(log_prompts=True).test_client()
    upstream.then(drop)
    client.post("/generate", json={"prompt": "Tell me a joke."}, headers={"X-API-KEY": USER_KEY})
    [line] = request_lines(quiet)
    assert (line["status"], line["prompt"], line["output"]) == (502, "Tell me a joke.", None)


def test_server_errors_are_logged_at_error_level(generate, upstream, quiet):
    upstream.then(drop)
    generate()
    [line] = request_lines(quiet)
    assert (line["status"], line["level"]) == (502, "ERROR")


def test_an_errors_code_is_in_its_log_line_and_a_success_has_none(generate, upstream, quiet):
    upstream.then(drop)
    generate()
    generate()
    failed, succeeded = request_lines(quiet)
    assert (failed["status"], failed["error_code"]) == (502, "upstream_unavailable")
    assert (succeeded["status"], succeeded["error_code"]) == (200, None)


def test_other_log_records_are_json_too(make_app, quiet):
    make_app(llm_provider="mock")  # warns that answers come from the mock
    lines = [json.loads(line) for line in quiet.readouterr().out.splitlines()]
    assert any(line["level"] == "WARNING" and "LLM_PROVIDER=mock" in line["message"] for line in lines)


def test_start_up_configuration_masks_secrets_and_shows_only_the_base_urls_host():
    settings = make_settings(
        openai_base_url="https://models.example.com:8443/v1",
        admin_api_keys="",
        redis_url="redis://:redis-password-42@cache.example.com:6379/0",
    )
    shown = effective_configuration(settings)
    assert shown["api_keys"] == "***"
    assert shown["openai_api_key"] == "***"
    assert shown["admin_api_keys"] is None
    assert shown["openai_base_url"] == "models.example.com"
    assert shown["redis_url"] == "cache.example.com"
    assert "redis-password-42" not in json.dumps(shown)
    assert {"llm_provider", "openai_model", "worker_class", "web_concurrency", "max_prompt_chars"} <= set(shown)
    assert USER_KEY not in json.dumps(shown) and UPSTREAM_KEY not in json.dumps(shown)


def test_a_batch_logs_one_line_with_the_whole_batchs_tokens(client, quiet):
    client.post("/generate/batch", json={"prompts": ["one two", "three"]}, headers={"X-API-KEY": USER_KEY})
    (line,) = [line for line in request_lines(quiet) if line["path"] == "/generate/batch"]
    assert line["prompt_tokens"] == 3
    assert line["completion_tokens"] == 5
    assert line["upstream_ms"] is not None
    assert line["cached"] is False
