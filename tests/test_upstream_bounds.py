"""What an upstream may send back is bounded: its size, as sent and decompressed, its depth, its numbers, redirects,
and the text, ids and names that cross from it to the client and the log."""

import gzip
import json
import socket
import ssl

import httpx2
import pytest

from app import create_app
from tests.conftest import UPSTREAM_KEY, USER_KEY, make_settings
from tests.fake_openai import Raw, completion_body
from tests.test_upstream import check_error_then_recovery, upstream_error

CAP = 100_000


def post(client, **body):
    return client.post("/generate", json={"prompt": "hi"} | body, headers={"X-API-KEY": USER_KEY})


def socket_app(fake_openai, **overrides):
    """An app on the real upstream transport, talking to the loopback fake server."""
    return create_app(make_settings(openai_base_url=fake_openai.base_url, max_upstream_bytes=CAP, **overrides))


def completion_json(text: str) -> bytes:
    return json.dumps(completion_body({"messages": [{"content": text}], "max_tokens": 10**9}, 1)).encode()


def raw_answer(body: bytes, headers: dict, status: int = 200) -> Raw:
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json"] + [f"{k}: {v}" for k, v in headers.items()]
    return Raw(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def chunked(body: bytes, size: int = 16_384) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_an_upstream_answer_over_max_upstream_bytes_is_502(fake_openai, caplog):
    fake_openai.then(raw_answer(chunked(completion_json("x" * (CAP * 10))), {"Transfer-Encoding": "chunked"}))
    client = socket_app(fake_openai).test_client()
    response = post(client)
    assert (response.status_code, response.get_json()["error"]["code"]) == (502, "upstream_bad_response")
    assert "MAX_UPSTREAM_BYTES" in caplog.text
    assert post(client).status_code == 200


def test_a_gzip_answer_that_inflates_past_max_upstream_bytes_is_502(fake_openai):
    bomb = gzip.compress(completion_json("x " * (CAP * 25)))
    assert len(bomb) < CAP
    fake_openai.then(raw_answer(bomb, {"Content-Encoding": "gzip", "Content-Length": len(bomb)}))
    response = post(socket_app(fake_openai).test_client())
    assert (response.status_code, response.get_json()["error"]["code"]) == (502, "upstream_bad_response")


def test_a_gzip_answer_within_max_upstream_bytes_is_read(fake_openai):
    body = gzip.compress(completion_json("compressed"))
    fake_openai.then(raw_answer(body, {"Content-Encoding": "gzip", "Content-Length": len(body)}))
    response = post(socket_app(fake_openai).test_client())
    assert response.status_code == 200
    assert response.get_json()["response"].startswith("echo: compressed")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_an_upstream_redirect_is_not_followed_and_is_502_named_in_the_log(fake_openai, caplog, status):
    location = "https://elsewhere.example/v1/chat/completions?token=abc"
    fake_openai.then(raw_answer(b"", {"Location": location, "Content-Length": 0}, status))
    response = post(socket_app(fake_openai).test_client())
    assert (response.status_code, response.get_json()["error"]["code"]) == (502, "upstream_error")
    assert fake_openai.calls == 1
    assert f"redirect (HTTP {status} to https://elsewhere.example)" in caplog.text
    assert "token=abc" not in caplog.text


def test_upstream_json_nested_too_deep_to_parse_is_502(generate, upstream):
    upstream.then(httpx2.Response(200, content=b"[" * 100_000 + b"]" * 100_000))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


@pytest.mark.parametrize("count", [10**300, 10**400])
def test_an_upstream_usage_count_too_large_to_be_one_is_502(generate, upstream, count):
    body = completion_json("hi").replace(b'"prompt_tokens": 1', b'"prompt_tokens": %d' % count)
    upstream.then(httpx2.Response(200, content=body))
    check_error_then_recovery(generate, 502, "upstream_bad_response")


def test_upstream_408_is_retried_like_a_timeout(make_app, upstream):
    client = make_app(openai_max_retries=1).test_client()
    upstream.then(upstream_error(408, "Request timed out"))
    assert post(client).status_code == 200
    assert upstream.calls == 2


def test_upstream_408_after_the_retries_is_504(generate, upstream):
    upstream.then(upstream_error(408, "Request timed out"))
    check_error_then_recovery(generate, 504, "upstream_timeout")


def test_the_upstream_key_straddling_the_cut_never_reaches_the_client(generate, upstream):
    upstream.then(upstream_error(400, "x" * 490 + f" {UPSTREAM_KEY} is not allowed"))
    message = generate().get_json()["error"]["message"]
    assert UPSTREAM_KEY[:8] not in message


def test_the_upstream_key_is_redacted_whatever_its_case(generate, upstream):
    upstream.then(upstream_error(400, f"key {UPSTREAM_KEY.upper()} may not ask for this"))
    message = generate().get_json()["error"]["message"]
    assert UPSTREAM_KEY.upper() not in message
    assert "[redacted]" in message


def test_a_gateways_own_400_is_502_and_its_text_goes_only_to_the_log(generate, upstream, caplog):
    # The LiteLLM proxy's answer to a key it cannot check.
    upstream.then(upstream_error(400, "No connected db.", error_type="no_db_connection"))
    response = check_error_then_recovery(generate, 502, "upstream_error")
    assert "No connected db." not in response.get_data(as_text=True)
    assert "No connected db." in caplog.text


def test_an_upstream_400_that_is_not_an_openai_error_is_502(generate, upstream):
    upstream.then(httpx2.Response(400, text="Bad Request: the gateway's database is down"))
    response = check_error_then_recovery(generate, 502, "upstream_error")
    assert "database" not in response.get_data(as_text=True)


def request_log_line(caplog) -> dict:
    (record,) = [r for r in caplog.records if r.name == "genapi.request"]
    return record.fields


@pytest.mark.parametrize("header", ["a" * 300, "id with spaces", "<script>"])
def test_an_upstream_request_id_that_is_not_short_and_plain_is_not_logged(generate, upstream, caplog, header):
    upstream.then(lambda request: httpx2.Response(200, content=completion_json("hi"), headers={"x-request-id": header}))
    generate()
    assert request_log_line(caplog)["upstream_request_id"] != header


def test_without_an_upstream_request_id_header_the_completions_id_is_logged(generate, upstream, caplog):
    upstream.then(lambda request: httpx2.Response(200, content=completion_json("hi")))
    generate()
    assert request_log_line(caplog)["upstream_request_id"] == "chatcmpl-fake-1"


@pytest.mark.parametrize(
    "reported, shown",
    [
        ("/models/llama-3-8b-instruct.Q4_K_M.gguf", "llama-3-8b-instruct.Q4_K_M"),
        ("C:\\models\\phi-3.gguf", "phi-3"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
    ],
)
def test_an_upstream_model_that_is_a_path_is_shown_as_a_name(generate, upstream, reported, shown):
    body = json.loads(completion_json("hi")) | {"model": reported}
    upstream.then(httpx2.Response(200, json=body))
    assert generate().get_json()["model"] == shown


def connect_error_from(cause):
    def fail(request):
        raise httpx2.ConnectError("connection failed", request=request) from cause

    return fail


@pytest.mark.parametrize(
    "cause, reason",
    [
        (socket.gaierror(-2, "Name or service not known"), "its host name did not resolve"),
        (ConnectionRefusedError(111, "Connection refused"), "the connection was refused"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS failed"),
    ],
)
def test_an_unreachable_upstream_is_logged_with_why(generate, upstream, caplog, cause, reason):
    upstream.then(connect_error_from(cause))
    check_error_then_recovery(generate, 502, "upstream_unavailable")
    assert f"could not be reached: {reason}" in caplog.text
    assert UPSTREAM_KEY not in caplog.text


def test_a_refused_connection_over_sockets_is_logged_as_refused(caplog):
    from tests.procfile import free_port

    app = create_app(make_settings(openai_base_url=f"http://127.0.0.1:{free_port()}/v1"))
    assert post(app.test_client()).status_code == 502
    assert "could not be reached: the connection was refused" in caplog.text


@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "soon"])
def test_an_upstream_retry_after_that_is_no_number_of_seconds_still_gives_a_503(generate, upstream, header, value):
    upstream.then(upstream_error(429, headers={header: value}))
    response = check_error_then_recovery(generate, 503, "upstream_rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_an_upstream_finish_reason_is_cut_short(generate, upstream):
    body = json.loads(completion_json("hi"))
    body["choices"][0]["finish_reason"] = "stop" * 5000
    upstream.then(httpx2.Response(200, json=body))
    assert len(generate().get_json()["finish_reason"]) <= 40
