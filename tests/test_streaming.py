"""POST /generate with "stream": true: events as the model sends them, errors before and after the first byte, bounds."""

import json

import pytest
from pydantic import ValidationError

from app import create_app
from genapi import metrics
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.fake_openai import DROP, HANG, Status, Stream
from tests.test_metrics import sample

FAST = {"stream_heartbeat_seconds": 0.1, "stream_first_token_timeout": 5, "stream_idle_timeout": 5}


def parse_events(text: str) -> list[tuple[str, object]]:
    """An event stream as (event name, data) pairs; a comment (a heartbeat) is ("heartbeat", None).

    The comment that opens every stream the model server has answered (`: open`) is left out.
    """
    events = []
    for block in text.split("\n\n"):
        if not block or block == ": open":
            continue
        if block.startswith(":"):
            events.append(("heartbeat", None))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


@pytest.fixture
def make_streaming_app(fake_openai):
    """An app on the loopback fake upstream (real HTTP, real streams); keyword arguments override settings."""

    def build(**overrides):
        settings = make_settings(openai_base_url=fake_openai.base_url, **(FAST | overrides))
        app = create_app(settings)
        app.config["TESTING"] = True
        return app

    return build


@pytest.fixture
def stream(make_streaming_app):
    """POST /generate with "stream": true; returns (response, events) once the stream has ended."""
    apps = {}

    def post(settings=None, headers=None, **body):
        key = json.dumps(settings or {}, sort_keys=True)
        app = apps.get(key) or apps.setdefault(key, make_streaming_app(**(settings or {})))
        body = {"prompt": "Tell me a joke.", "stream": True} | body
        response = app.test_client().post("/generate", json=body, headers={"X-API-KEY": USER_KEY} | (headers or {}))
        text = response.get_data(as_text=True)
        response.close()
        return response, parse_events(text) if response.mimetype == "text/event-stream" else None

    return post


def texts(events) -> str:
    return "".join(data["text"] for name, data in events if name == "delta")


def test_stream_sends_text_pieces_then_one_done_event(stream, fake_openai):
    response, events = stream(prompt="three little words")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers and "X-Request-ID" in response.headers
    names = [name for name, _ in events]
    assert names.count("delta") == 4 and names[-1] == "done" and names.count("done") == 1
    assert texts(events) == "echo: three little words"
    done = events[-1][1]
    assert done == {
        "model": "test-model",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "id": response.headers["X-Request-ID"],
        "cached": False,
    }


def test_stream_asks_the_model_server_for_usage(stream, fake_openai):
    stream()
    body = fake_openai.requests[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_mock_provider_streams_word_by_word(make_app):
    app = make_app(llm_provider="mock", mock_stream_delay=0)
    response = app.test_client().post("/generate", json={"prompt": "hi", "stream": True}, headers={"X-API-KEY": USER_KEY})
    events = parse_events(response.get_data(as_text=True))
    non_streamed = app.test_client().post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert texts(events) == non_streamed.get_json()["response"]
    assert len([name for name, _ in events if name == "delta"]) == len(texts(events).split())
    assert events[-1][1]["model"] == "mock" and events[-1][1]["usage"] == non_streamed.get_json()["usage"]


def test_cache_hit_on_a_streaming_request_is_streamed(stream, fake_openai):
    _, first = stream(settings={"cache_ttl": 60})
    response, second = stream(settings={"cache_ttl": 60})
    assert fake_openai.calls == 1
    assert response.headers["X-Cache"] == "HIT"
    assert texts(second) == texts(first) and second[-1][0] == "done"
    assert second[-1][1]["cached"] is True and second[-1][1]["usage"] == first[-1][1]["usage"]


def test_a_streamed_answer_is_cached_for_a_non_streamed_request(stream, make_streaming_app, fake_openai):
    app = make_streaming_app(cache_ttl=60)
    headers = {"X-API-KEY": USER_KEY}
    streamed = parse_events(app.test_client().post("/generate", json={"prompt": "p", "stream": True}, headers=headers).get_data(as_text=True))
    plain = app.test_client().post("/generate", json={"prompt": "p"}, headers=headers)
    assert plain.get_json()["cached"] is True and plain.get_json()["response"] == texts(streamed)
    assert fake_openai.calls == 1


def test_stream_cut_by_the_model_server_is_an_error_event_and_is_not_cached(stream, fake_openai):
    fake_openai.then(Stream(cut_at=2))
    _, events = stream(settings={"cache_ttl": 60})
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    assert events[-1][1]["error"]["code"] == "upstream_error"
    _, again = stream(settings={"cache_ttl": 60})
    assert fake_openai.calls == 2 and again[-1][0] == "done"


def test_stream_that_ends_without_finish_or_done_is_an_error_event(stream, fake_openai):
    fake_openai.then(Stream(finish=False, usage=False))
    _, events = stream()
    assert events[-1][0] == "error" and "done" not in [name for name, _ in events]


def test_error_object_after_the_first_byte_is_an_error_event_and_no_done(stream, fake_openai):
    fake_openai.then(Stream(error_at=2))
    _, events = stream()
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    error = events[-1][1]["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        (Status(401), 502, "upstream_auth"),
        (Status(429), 503, "upstream_rate_limited"),
        (Status(400, "context too long"), 400, "upstream_rejected_request"),
        (Status(500), 502, "upstream_error"),
        (DROP, 502, "upstream_unavailable"),
    ],
)
def test_upstream_refusal_before_the_first_byte_is_the_ordinary_json_error(stream, fake_openai, behaviour, status, code):
    fake_openai.then(behaviour)
    response, events = stream()
    assert events is None
    assert response.status_code == status and response.get_json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("body", "headers", "settings", "status", "code"),
    [
        ({}, {"X-API-KEY": ""}, {}, 401, "missing_api_key"),
        ({}, {"X-API-KEY": "wrong-key"}, {}, 403, "invalid_api_key"),
        ({"stream": "yes"}, {}, {}, 422, "validation_error"),
        ({"model": "other"}, {}, {"allowed_models": "test-model"}, 422, "model_not_allowed"),
        ({}, {}, {"rate_limit": "0/minute"}, 422, "over_rate_limit"),
    ],
)
def test_refusal_by_genapi_before_the_first_byte_is_the_ordinary_json_error(stream, fake_openai, body, headers, settings, status, code):
    response, events = stream(settings=settings, headers=headers, **body)
    assert events is None and response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert fake_openai.calls == 0


def test_rate_limit_applies_to_streams(stream, fake_openai):
    stream(settings={"rate_limit": "1/minute"})
    response, events = stream(settings={"rate_limit": "1/minute"})
    assert response.status_code == 429 and response.get_json()["error"]["code"] == "rate_limit_exceeded"


def test_upstream_failure_before_the_first_byte_is_retried(stream, fake_openai):
    fake_openai.then(Status(500))
    _, events = stream(settings={"openai_max_retries": 1})
    assert events[-1][0] == "done" and fake_openai.calls == 2


def test_upstream_failure_after_the_first_byte_is_never_retried(stream, fake_openai):
    fake_openai.then(Stream(cut_at=1))
    _, events = stream(settings={"openai_max_retries": 1})
    assert events[-1][0] == "error" and fake_openai.calls == 1


def test_heartbeats_keep_the_stream_alive_while_the_model_is_silent(stream, fake_openai):
    fake_openai.then(Stream(silent_at=1, silence=1.0))
    _, events = stream(settings={"stream_heartbeat_seconds": 0.1})
    names = [name for name, _ in events]
    assert names.count("heartbeat") >= 3
    assert names[0] == "delta" and names[-1] == "done"


def test_no_first_chunk_within_the_bound_and_no_byte_sent_is_a_504(stream, fake_openai):
    fake_openai.then(HANG)
    response, events = stream(settings={"stream_heartbeat_seconds": 5, "stream_first_token_timeout": 0.3})
    assert events is None and response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"


def test_no_first_chunk_within_the_bound_after_heartbeats_is_an_error_event(stream, fake_openai):
    fake_openai.then(HANG)
    response, events = stream(settings={"stream_heartbeat_seconds": 0.1, "stream_first_token_timeout": 0.5})
    assert response.status_code == 200
    assert events[0][0] == "heartbeat"
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "upstream_timeout"


def test_silence_between_chunks_past_the_idle_bound_is_an_error_event(stream, fake_openai):
    fake_openai.then(Stream(silent_at=2))
    _, events = stream(settings={"stream_idle_timeout": 0.4})
    names = [name for name, _ in events]
    assert names[:2] == ["delta", "delta"] and names[-1] == "error" and "done" not in names
    assert events[-1][1]["error"]["code"] == "upstream_timeout"


def test_stream_longer_than_its_maximum_is_an_error_event(stream, fake_openai):
    fake_openai.then(Stream(gap=0.1))
    bounds = {"stream_first_token_timeout": 0.5, "stream_idle_timeout": 0.5, "stream_max_seconds": 0.5}
    _, events = stream(settings=bounds, prompt=" ".join(["word"] * 30))
    names = [name for name, _ in events]
    assert "delta" in names and names[-1] == "error" and "done" not in names
    assert events[-1][1]["error"]["code"] == "upstream_timeout"


def test_usage_is_estimated_and_marked_when_the_model_server_sends_none(stream, fake_openai):
    fake_openai.then(Stream(usage=False))
    _, events = stream(prompt="a prompt of twenty-eight chars")
    usage = events[-1][1]["usage"]
    assert usage["estimated"] is True
    assert usage["prompt_tokens"] == 8  # 30 characters, at 4 a token
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_usage_counts_that_are_not_counts_are_estimated_instead(stream, fake_openai):
    fake_openai.then(Stream(usage_counts={"prompt_tokens": 10**400, "completion_tokens": -3, "total_tokens": 1}))
    _, events = stream()
    name, done = events[-1]
    assert name == "done" and done["usage"]["estimated"] is True
    assert done["usage"]["prompt_tokens"] < 100


def test_a_model_named_by_a_path_on_the_servers_disk_is_streamed_as_its_files_name(stream, fake_openai):
    _, events = stream(settings={"allowed_models": "/models/tiny-chat.Q4_K_M.gguf"}, model="/models/tiny-chat.Q4_K_M.gguf")
    assert events[-1] == ("done", events[-1][1]) and events[-1][1]["model"] == "tiny-chat.Q4_K_M"


def request_lines(capsys) -> list[dict]:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return [line for line in lines if line["logger"] == "genapi.request"]


def test_each_stream_writes_one_log_line_at_its_end(stream, fake_openai, capsys):
    capsys.readouterr()
    response, _ = stream(headers={"X-Request-ID": "stream-42"})
    [line] = request_lines(capsys)
    assert line["request_id"] == "stream-42" and line["status"] == 200
    assert line["stream_ending"] == "completed" and line["tokens_estimated"] is False
    assert line["chunks"] >= 4 and line["first_token_ms"] >= 0 and line["duration_ms"] >= line["first_token_ms"]
    assert line["prompt_tokens"] == 4 and line["completion_tokens"] == 5
    assert line["upstream_request_id"].startswith("req_fake_")
    assert "prompt" not in line and "output" not in line


@pytest.mark.parametrize("header, logged", [
    ("req_\u202e<script>" + "x" * 300, "chatcmpl-fake-"),  # not plain: the chunks' own id instead
    ("", "chatcmpl-fake-"),  # no header: the chunks' own id
])
def test_stream_log_line_has_a_plain_upstream_id_or_the_chunks_own(stream, fake_openai, capsys, header, logged):
    fake_openai.then(Stream(request_id=header))
    capsys.readouterr()
    stream()
    [line] = request_lines(capsys)
    assert line["upstream_request_id"].startswith(logged)


def test_stream_log_line_holds_the_prompt_and_output_only_with_log_prompts(stream, fake_openai, capsys):
    capsys.readouterr()
    stream(settings={"log_prompts": True}, prompt="say this")
    [line] = request_lines(capsys)
    assert line["prompt"] == "say this" and line["output"] == "echo: say this"


def test_stream_that_failed_is_logged_with_its_ending_and_error_code(stream, fake_openai, capsys):
    fake_openai.then(Stream(cut_at=1))
    capsys.readouterr()
    stream()
    [line] = request_lines(capsys)
    assert line["stream_ending"] == "upstream_error" and line["error_code"] == "upstream_error"
    assert line["level"] == "ERROR" and line["tokens_estimated"] is True


def test_streams_are_counted_once_with_their_endings_and_first_token_time(stream, fake_openai):
    requests = sample("genapi_requests_total", route="/generate", method="POST", status="200")
    completed = sample("genapi_stream_endings_total", ending="completed")
    cut = sample("genapi_stream_endings_total", ending="upstream_error")
    first_tokens = sample("genapi_stream_first_token_seconds_count")
    estimated = sample("genapi_stream_tokens_total", direction="out", estimated="true")
    stream()
    fake_openai.then(Stream(cut_at=1))
    stream()
    assert sample("genapi_requests_total", route="/generate", method="POST", status="200") == requests + 2
    assert sample("genapi_stream_endings_total", ending="completed") == completed + 1
    assert sample("genapi_stream_endings_total", ending="upstream_error") == cut + 1
    assert sample("genapi_stream_first_token_seconds_count") == first_tokens + 2
    assert sample("genapi_stream_tokens_total", direction="out", estimated="true") > estimated
    assert metrics.STREAMS_IN_FLIGHT._value.get() == 0


def test_client_that_stops_reading_closes_the_upstream_stream(make_streaming_app, fake_openai, capsys):
    fake_openai.then(Stream(hold_at=1))
    app = make_streaming_app()
    response = app.test_client().post("/generate", json={"prompt": "a b c", "stream": True},
                                      headers={"X-API-KEY": USER_KEY})
    pieces = iter(response.response)
    while b"event: delta" not in next(pieces):
        pass
    capsys.readouterr()
    response.close()  # what the WSGI server does when a write to the client fails
    assert fake_openai.wait_for_abandoned_streams(1, timeout=10)
    [line] = request_lines(capsys)
    assert line["stream_ending"] == "client_disconnected"
    assert line["completion_tokens"] >= 1 and line["tokens_estimated"] is True


def test_streams_one_after_another_reuse_one_upstream_connection(stream, fake_openai):
    for _ in range(3):
        _, events = stream()
        assert events[-1][0] == "done"
    assert fake_openai.connections == 1


def test_a_model_server_that_never_ends_its_body_after_done_is_hung_up_on(make_streaming_app, fake_openai):
    # A stream's reads wait without a timeout while the relay bounds them; once [DONE] is in, the relay may have
    # ended, and the call's own read timeout (the stream bounds' longest, and 5 s) bounds the wait for the end.
    fake_openai.then(Stream(end_held=True))
    app = make_streaming_app(stream_first_token_timeout=1, stream_idle_timeout=1)
    response = app.test_client().post("/generate", json={"prompt": "a b c", "stream": True},
                                      headers={"X-API-KEY": USER_KEY})
    events = parse_events(response.get_data(as_text=True))
    response.close()
    assert texts(events) == "echo: a b c" and events[-1][0] == "done"
    assert fake_openai.wait_for_abandoned_streams(1, timeout=30)


def test_batch_takes_no_stream_field(client):
    response = client.post("/generate/batch", json={"prompts": ["a"], "stream": True}, headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 422 and response.get_json()["error"]["param"] == "stream"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"stream_heartbeat_seconds": 26}, "stream_heartbeat_seconds"),  # past Heroku's 30 s with no margin
        ({"stream_max_seconds": 10}, "STREAM_MAX_SECONDS"),  # shorter than the first-token bound it contains
        ({"stream_idle_timeout": 0}, "stream_idle_timeout"),
    ],
)
def test_stream_bounds_that_cannot_hold_stop_start_up(overrides, named):
    with pytest.raises(ValidationError, match=named):
        make_settings(**overrides)
