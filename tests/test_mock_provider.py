"""The offline mock provider: deterministic, honours max_tokens, reports usage, says it is a mock."""

import pytest

from tests.conftest import USER_KEY


@pytest.fixture
def mock_client(make_app):
    return make_app(llm_provider="mock", openai_api_key=None).test_client()


def ask(client, **body):
    return client.post("/generate", json={"prompt": "Tell me a joke."} | body, headers={"X-API-KEY": USER_KEY})


def test_mock_says_model_mock(mock_client):
    body = ask(mock_client).get_json()
    assert body["model"] == "mock"
    assert "mock" in body["response"]


def test_mock_answers_the_same_prompt_the_same_way(mock_client):
    assert ask(mock_client).get_json()["response"] == ask(mock_client).get_json()["response"]
    assert ask(mock_client).get_json()["response"] != ask(mock_client, prompt="Another.").get_json()["response"]


def test_mock_honours_max_tokens(mock_client):
    body = ask(mock_client, max_tokens=3).get_json()
    assert len(body["response"].split()) == 3
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_mock_reports_usage(mock_client):
    usage = ask(mock_client).get_json()["usage"]
    assert usage["prompt_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_mock_makes_no_upstream_call(mock_client, upstream):
    ask(mock_client)
    assert upstream.calls == 0


def test_mock_logs_how_to_switch_to_a_real_model(make_app, caplog):
    make_app(llm_provider="mock", openai_api_key=None)
    assert any("OPENAI_API_KEY" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
