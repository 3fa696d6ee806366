"""Streams through a real gunicorn (the Procfile's web line), with gevent and with gthread workers."""

import json
import signal
import time

import httpx2
import pytest

from tests.conftest import USER_KEY
from tests.fake_openai import Stream

STREAM_BODY = {"prompt": "one two three four", "stream": True}


@pytest.fixture(params=["gevent", "gthread"])
def worker_class(request) -> str:
    return request.param


def open_stream(service, client: httpx2.Client, body=STREAM_BODY):
    return client.stream("POST", f"{service.url}/generate", json=body, headers={"X-API-KEY": USER_KEY})


def events_of(lines):
    """(event, data) pairs from an iterator of SSE lines; heartbeats as ("heartbeat", None), without the comment
    that opens the stream (`: open`)."""
    event = None
    for line in lines:
        if line == ": open":
            continue
        if line.startswith(":"):
            yield "heartbeat", None
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])
            event = None


def wait_for_log_line(service, predicate, seconds: float = 15) -> dict:
    """The service's first JSON log line that matches; the line is written by another process, so this polls."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for text in service.output().splitlines():
            if text.startswith("{"):
                line = json.loads(text)
                if predicate(line):
                    return line
        time.sleep(0.05)
    raise AssertionError(f"no such log line:\n{service.output()}")


def test_each_chunk_is_sent_as_it_arrives(start_procfile_service, fake_openai, worker_class):
    fake_openai.then(Stream(hold_at=1))  # the second chunk waits until this test has read the first
    service = start_procfile_service(fake_openai.base_url, WORKER_CLASS=worker_class)
    with httpx2.Client(timeout=20) as client, open_stream(service, client) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        events = events_of(response.iter_lines())
        assert next(events) == ("delta", {"text": "echo:"})
        fake_openai.release()
        rest = list(events)
    assert [event for event, _ in rest][-1] == "done"
    assert "".join(data["text"] for event, data in rest if event == "delta") == " one two three four"


def test_headers_and_a_first_comment_come_as_soon_as_the_model_server_answers(start_procfile_service, fake_openai,
                                                                             worker_class):
    fake_openai.then(Stream(hold_at=0))  # the status is sent, the first chunk waits until this test has read
    # The client's read timeout is below the heartbeat: only a byte sent at once, not a heartbeat, reaches it.
    service = start_procfile_service(fake_openai.base_url, WORKER_CLASS=worker_class, STREAM_HEARTBEAT_SECONDS="20")
    with httpx2.Client(timeout=8) as client, open_stream(service, client) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == ": open"
        fake_openai.release()
        names = [event for event, _ in events_of(lines)]
    assert names[0] == "delta" and names[-1] == "done"


def test_client_that_hangs_up_on_a_silent_stream_closes_the_upstream_at_the_next_heartbeat(
        start_procfile_service, fake_openai, worker_class):
    fake_openai.then(Stream(hold_at=2))
    service = start_procfile_service(fake_openai.base_url, WORKER_CLASS=worker_class, STREAM_HEARTBEAT_SECONDS="4")
    with httpx2.Client(timeout=20) as client, open_stream(service, client) as response:
        events = events_of(response.iter_lines())
        assert next(events)[0] == "delta" and next(events)[0] == "delta"
    # The client is gone. The first heartbeat after it (4 s on) sees the hang-up and closes the model server's
    # stream; a relay that relied on the heartbeat's write failing would close it only at the second (8 s on).
    assert fake_openai.wait_for_abandoned_streams(1, timeout=6)
    line = wait_for_log_line(service, lambda line: line.get("stream_ending") is not None)
    assert line["stream_ending"] == "client_disconnected"
    assert line["completion_tokens"] >= 1 and line["tokens_estimated"] is True and line["chunks"] >= 2


def test_silence_many_heartbeats_long_still_reaches_the_end(start_procfile_service, fake_openai):
    # A heartbeat every 0.2 s through 2 s of silence: the 30 s of Heroku's router, at a fifteenth of the scale.
    fake_openai.then(Stream(silent_at=1, silence=2.0))
    service = start_procfile_service(fake_openai.base_url, STREAM_HEARTBEAT_SECONDS="0.2")
    with httpx2.Client(timeout=20) as client, open_stream(service, client) as response:
        names = [event for event, _ in events_of(response.iter_lines())]
    assert names.count("heartbeat") >= 5
    assert names[0] == "delta" and names[-1] == "done"


def test_stream_in_flight_at_sigterm_completes(start_procfile_service, fake_openai, worker_class):
    fake_openai.then(Stream(hold_at=1))
    service = start_procfile_service(fake_openai.base_url, WORKER_CLASS=worker_class)
    with httpx2.Client(timeout=20) as client, open_stream(service, client) as response:
        events = events_of(response.iter_lines())
        assert next(events)[0] == "delta"
        service.process.send_signal(signal.SIGTERM)
        fake_openai.release()
        names = [event for event, _ in events]
    assert names[-1] == "done"
    assert service.process.wait(30) == 0


def test_stream_that_cannot_finish_before_shutdown_ends_with_an_error_event(start_procfile_service, fake_openai, worker_class):
    fake_openai.then(Stream(hold_at=1))  # never released
    service = start_procfile_service(
        fake_openai.base_url, WORKER_CLASS=worker_class, GUNICORN_CMD_ARGS="--graceful-timeout 3",
        STREAM_HEARTBEAT_SECONDS="0.5",
    )
    with httpx2.Client(timeout=20) as client, open_stream(service, client) as response:
        events = events_of(response.iter_lines())
        assert next(events)[0] == "delta"
        service.process.send_signal(signal.SIGTERM)
        rest = [(event, data) for event, data in events if event != "heartbeat"]
    assert rest[-1][0] == "error" and rest[-1][1]["error"]["code"] == "server_shutting_down"
    assert "done" not in [event for event, _ in rest]
    assert service.process.wait(30) == 0
