"""Every upstream failure maps to its status in the one error shape, and the next request still succeeds.

The upstream here is the SDK's own transport (httpx2.MockTransport), so the real SDK code runs: its parsing,
its exception classes and its retries.
"""

import httpx2
import pytest
from openai import _base_client as openai_base_client

from config import SDK_INITIAL_RETRY_DELAY

from tests.conftest import UPSTREAM_KEY, USER_KEY


def upstream_error(status, message="upstream says no", headers=None, code=None, error_type="invalid_request_error"):
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return httpx2.Response(status, json=body, headers=headers)


def drop(request):
    raise httpx2.RemoteProtocolError("Server disconnected without sending a response.", request=request)


def timeout(request):
    raise httpx2.ReadTimeout("timed out", request=request)


def refuse(request):
    raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)


def check_error_then_recovery(generate, status, code):
    """The failing request gets `status` with `code`; the next one, with the upstream well again, gets 200."""
    response = generate()
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert generate().status_code == 200
    return response


def test_upstream_timeout_is_504(generate, upstream):
    upstream.then(timeout)
    check_error_then_recovery(generate, 504, "upstream_timeout")


def test_upstream_refused_connection_is_502(generate, upstream):
    upstream.then(refuse)
    check_error_then_recovery(generate, 502, "upstream_unavailable")


def test_upstream_dropped_connection_is_502(generate, upstream):
    upstream.then(drop)
    check_error_then_recovery(generate, 502, "upstream_unavailable")


def test_upstream_429_is_503_with_retry_after(generate, upstream):
    upstream.then(upstream_error(429, headers={"retry-after": "7"}))
    response = check_error_then_recovery(generate, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "7"


def test_upstream_429_without_retry_after_still_sends_one(generate, upstream):
    upstream.then(upstream_error(429))
    response = check_error_then_recovery(generate, 503, "upstream_rate_limited")
    assert int(response.headers["Retry-After"]) >= 1


def test_upstream_500_is_502(generate, upstream):
    upstream.then(upstream_error(500))
    check_error_then_recovery(generate, 502, "upstream_error")


def test_upstream_503_after_the_retries_is_503_with_retry_after(make_app, upstream):
    client = make_app(openai_max_retries=1).test_client()
    upstream.then(upstream_error(503), upstream_error(503, headers={"retry-after": "9"}))
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["Retry-After"] == "9"
    assert upstream.calls == 2


def test_upstream_401_is_502_and_hides_its_message_and_the_key(generate, upstream, caplog):
    upstream.then(upstream_error(401, f"Incorrect API key provided: {UPSTREAM_KEY}"))
    response = check_error_then_recovery(generate, 502, "upstream_auth")
    assert "Incorrect" not in response.get_data(as_text=True)
    assert UPSTREAM_KEY[-6:] not in response.get_data(as_text=True)
    assert any(r.levelname == "ERROR" and "OPENAI_API_KEY" in r.getMessage() for r in caplog.records)


def test_upstream_403_is_502(generate, upstream):
    upstream.then(upstream_error(403))
    check_error_then_recovery(generate, 502, "upstream_auth")


def test_upstream_400_is_400_with_its_explanation(generate, upstream):
    upstream.then(upstream_error(400, "This model's maximum context length is 8192 tokens."))
    response = check_error_then_recovery(generate, 400, "upstream_rejected_request")
    assert "maximum context length is 8192" in response.get_json()["error"]["message"]


def test_upstream_422_is_400(generate, upstream):
    upstream.then(upstream_error(422, "max_tokens is too large"))
    check_error_then_recovery(generate, 400, "upstream_rejected_request")


def test_upstream_out_of_quota_is_502_without_retry_after_and_is_logged(generate, upstream, caplog):
    upstream.then(upstream_error(429, "You exceeded your current quota", code="insufficient_quota"))
    response = check_error_then_recovery(generate, 502, "upstream_quota_exceeded")
    assert "Retry-After" not in response.headers
    assert "out of quota" in caplog.text


def test_upstream_404_with_an_openai_error_is_400_with_its_explanation(generate, upstream):
    upstream.then(upstream_error(404, "The model `gpt-9` does not exist", code="model_not_found"))
    response = check_error_then_recovery(generate, 400, "upstream_rejected_request")
    assert "gpt-9" in response.get_json()["error"]["message"]


def test_upstream_404_naming_the_model_without_a_code_is_400(generate, upstream):
    upstream.then(upstream_error(404, "model 'test-model' not found, try pulling it first"))
    check_error_then_recovery(generate, 400, "upstream_rejected_request")


@pytest.mark.parametrize(
    "answer",
    [httpx2.Response(404, text="404 page not found"),
     upstream_error(404, "Unknown request URL: POST /chat/completions.", code="unknown_url")],
    ids=["plain page", "openai unknown_url"],
)
def test_upstream_404_from_a_route_it_lacks_is_502_and_blames_the_base_url_in_the_log(
    generate, upstream, caplog, answer
):
    upstream.then(answer)
    check_error_then_recovery(generate, 502, "upstream_error")
    assert "check OPENAI_BASE_URL" in caplog.text


def test_a_placeholder_upstream_key_is_not_redacted_from_the_upstreams_explanation(make_app, upstream):
    client = make_app(openai_api_key="none").test_client()
    upstream.then(upstream_error(400, "none of the messages may be empty"))
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert "none of the messages may be empty" in response.get_json()["error"]["message"]


def test_the_real_upstream_key_is_redacted_from_the_upstreams_explanation(generate, upstream):
    upstream.then(upstream_error(400, f"key {UPSTREAM_KEY} may not ask for this"))
    message = generate().get_json()["error"]["message"]
    assert UPSTREAM_KEY not in message
    assert "[redacted]" in message


def test_a_bug_on_the_way_to_the_upstream_is_a_500_not_blamed_on_the_upstream(app, client, monkeypatch):
    provider = app.extensions["genapi"]["provider"]
    monkeypatch.setattr(provider.client, "post", lambda *args, **kwargs: int("not a number"))
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"


def test_upstream_body_that_is_not_json_is_502(generate, upstream):
    upstream.then(httpx2.Response(200, content=b"<html>oops</html>", headers={"content-type": "application/json"}))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


def test_upstream_text_body_is_502(generate, upstream):
    upstream.then(httpx2.Response(200, content=b"oops", headers={"content-type": "text/plain"}))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


def test_upstream_empty_choices_is_502(generate, upstream):
    upstream.then(httpx2.Response(200, json={"id": "x", "object": "chat.completion", "model": "m", "choices": []}))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


def test_upstream_json_of_another_shape_is_502(generate, upstream):
    upstream.then(httpx2.Response(200, json={"hello": "world"}))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


def test_with_one_retry_an_upstream_that_keeps_failing_with_500_is_called_twice(make_app, upstream):
    client = make_app(openai_max_retries=1).test_client()
    upstream.then(*[upstream_error(500)] * 5)
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 502
    assert upstream.calls == 2


def test_a_5xx_then_success_is_retried_into_a_200(make_app, upstream):
    client = make_app(openai_max_retries=1).test_client()
    upstream.then(upstream_error(503))
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 200
    assert upstream.calls == 2


def test_a_retry_waits_the_sdks_back_off_not_the_upstreams_retry_after(make_app, upstream, monkeypatch):
    waits = []
    monkeypatch.setattr(openai_base_client.time, "sleep", waits.append)
    client = make_app(openai_max_retries=1).test_client()
    upstream.then(upstream_error(503, headers={"retry-after": "60"}))
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 200
    (wait,) = waits
    assert wait <= SDK_INITIAL_RETRY_DELAY  # the SDK's first back-off (less its jitter), which fits Heroku's 30 s


def test_timeouts_and_dropped_connections_are_retried(make_app, upstream):
    client = make_app(openai_max_retries=2).test_client()
    upstream.then(timeout, drop)
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 200
    assert upstream.calls == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429])
def test_client_side_upstream_errors_are_never_retried(make_app, upstream, status):
    client = make_app(openai_max_retries=2).test_client()
    upstream.then(upstream_error(status))
    client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert upstream.calls == 1


def test_upstream_gets_our_key_and_never_the_clients(generate, upstream):
    generate()
    sent = upstream.requests[0].headers
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert USER_KEY not in str(sent.raw)
