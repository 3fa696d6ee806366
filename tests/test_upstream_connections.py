"""Upstream connections over real sockets: each call in flight gets a kept-alive connection, lent in constant time."""

import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpcore2
import httpx2
import pytest
from openai import _base_client as openai_base_client

from tests.conftest import USER_KEY, make_settings
from tests.fake_openai import CLOSE, DROP, TRICKLE, TRICKLE_SECONDS

from app import create_app
from genapi import upstream_http
from genapi.upstream_http import ConnectionPerCallTransport, Deadline, DeadlineBackend, DeadlineStream


CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def generate_app(fake_openai):
    return create_app(make_settings(openai_base_url=fake_openai.base_url))


def post(app) -> int:
    client = app.test_client()
    return client.post("/generate", json={"prompt": "Tell me a joke."}, headers={"X-API-KEY": USER_KEY}).status_code


def together(fake_openai, count: int, call) -> list:
    """`count` calls at once, held at the upstream until all of them are there; their results."""
    fake_openai.delay = 0.3
    with ThreadPoolExecutor(count) as pool:
        answers = [pool.submit(call) for _ in range(count)]
        assert fake_openai.wait_for_in_flight(count)
        return [answer.result() for answer in answers]


def chat_status(client: httpx2.Client) -> int:
    return client.post("/chat/completions", json=CHAT).status_code


def test_calls_one_after_another_reuse_one_upstream_connection(fake_openai):
    app = generate_app(fake_openai)
    assert [post(app) for _ in range(3)] == [200, 200, 200]
    assert fake_openai.connections == 1


def test_calls_in_flight_together_each_get_a_connection_and_keep_it_for_the_next_round(fake_openai):
    app = generate_app(fake_openai)
    assert together(fake_openai, 5, lambda: post(app)) == [200] * 5
    assert together(fake_openai, 5, lambda: post(app)) == [200] * 5
    assert fake_openai.connections == 5


def test_a_connection_the_upstream_closed_is_replaced_on_the_next_call(fake_openai):
    app = generate_app(fake_openai)
    fake_openai.then(CLOSE)
    assert post(app) == 200
    # The close reaches our idle socket a moment later; a call sent before it would be a real race, and 502 here.
    assert fake_openai.wait_for_closed_connections(1)
    assert [post(app), post(app)] == [200, 200]
    assert fake_openai.connections == 2


def test_a_connection_that_failed_mid_call_is_replaced_on_the_next_call(fake_openai):
    app = create_app(make_settings(openai_base_url=fake_openai.base_url, openai_max_retries=0))
    fake_openai.then(DROP)
    assert [post(app), post(app), post(app)] == [502, 200, 200]
    assert fake_openai.connections == 2


def test_idle_connections_beyond_the_limit_are_closed_not_kept(fake_openai):
    transport = ConnectionPerCallTransport(max_idle=1)
    with httpx2.Client(transport=transport, base_url=fake_openai.base_url) as client:
        assert together(fake_openai, 3, lambda: chat_status(client)) == [200, 200, 200]
        assert len(transport._idle) == 1


def test_closing_the_client_closes_its_idle_connections(fake_openai):
    transport = ConnectionPerCallTransport(max_idle=4)
    with httpx2.Client(transport=transport, base_url=fake_openai.base_url) as client:
        assert client.get("/healthz").status_code == 200
        _, idle = transport._idle[0]
    assert not transport._idle
    assert not idle.is_open


def test_the_connection_idle_longest_is_closed_once_it_outlives_the_keep_alive_expiry(fake_openai):
    transport = ConnectionPerCallTransport(max_idle=4, keepalive_expiry=0.2)
    with httpx2.Client(transport=transport, base_url=fake_openai.base_url) as client:
        assert together(fake_openai, 2, lambda: chat_status(client)) == [200, 200]
        (_, oldest), _ = transport._idle
        time.sleep(0.3)  # both outlive the expiry; the next call takes the newest, and its put-back closes the oldest
        fake_openai.delay = 0.0
        assert chat_status(client) == 200
        assert len(transport._idle) == 1
        assert not oldest.is_open


def test_idle_connections_are_closed_once_they_outlive_the_keep_alive_expiry_with_no_call_after_them(fake_openai):
    transport = ConnectionPerCallTransport(max_idle=4, keepalive_expiry=0.2)
    with httpx2.Client(transport=transport, base_url=fake_openai.base_url) as client:
        assert together(fake_openai, 3, lambda: chat_status(client)) == [200, 200, 200]
        assert fake_openai.wait_for_closed_connections(3, timeout=30)
        assert len(transport._idle) == 0


def test_the_sdks_platform_probe_runs_while_the_app_is_built_so_before_gunicorn_forks(fake_openai):
    openai_base_client.platform_headers.cache_clear()  # as in a fresh process
    app = generate_app(fake_openai)
    assert openai_base_client.platform_headers.cache_info().currsize == 1
    assert post(app) == 200
    assert openai_base_client.platform_headers.cache_info().misses == 1


def test_an_answer_that_trickles_in_past_openai_timeout_is_a_504_though_each_read_is_in_time(fake_openai):
    timeout = TRICKLE_SECONDS / 3  # each piece of the body comes well inside it; the whole body does not
    app = create_app(make_settings(openai_base_url=fake_openai.base_url, openai_timeout=timeout))
    fake_openai.then(TRICKLE)
    response = app.test_client().post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert post(app) == 200


def test_an_answer_that_trickles_in_inside_openai_timeout_is_a_200(fake_openai):
    app = create_app(make_settings(openai_base_url=fake_openai.base_url, openai_timeout=TRICKLE_SECONDS * 2))
    fake_openai.then(TRICKLE)
    assert post(app) == 200


def test_a_retry_after_an_attempt_ran_out_of_time_gets_a_fresh_deadline(fake_openai):
    settings = make_settings(
        openai_base_url=fake_openai.base_url, openai_timeout=TRICKLE_SECONDS / 3, openai_max_retries=1
    )
    fake_openai.then(TRICKLE)
    assert post(create_app(settings)) == 200
    assert fake_openai.calls == 2


def test_an_idle_connection_keeps_no_deadline_from_its_last_call(fake_openai):
    transport = ConnectionPerCallTransport(max_idle=4, attempt_seconds=30)
    with httpx2.Client(transport=transport, base_url=fake_openai.base_url) as client:
        assert chat_status(client) == 200
        (_, idle), = transport._idle
        assert idle.deadline.at == math.inf


class ClockedDeadline(Deadline):
    """A deadline 10 s away, and a stand-in for the time that each connect or send takes: `spend` moves it closer."""

    def __init__(self):
        super().__init__()
        self.at = time.monotonic() + 10

    def spend(self, seconds: float) -> None:
        self.at -= seconds


def test_each_address_of_a_host_gets_only_the_time_the_attempt_has_left(monkeypatch):
    deadline, tried = ClockedDeadline(), []

    class Unreachable:
        def connect_tcp(self, host, port, timeout, local_address, socket_options):
            tried.append(timeout)
            deadline.spend(4)  # each address takes 4 s to fail
            raise httpcore2.ConnectTimeout("no answer")

    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"127.0.0.{n}", 443)) for n in range(2, 6)]
    monkeypatch.setattr(upstream_http.socket, "getaddrinfo", lambda *args, **kwargs: addresses)
    backend = DeadlineBackend(deadline)
    backend._backend = Unreachable()
    with pytest.raises(httpcore2.ConnectTimeout):
        backend.connect_tcp("models.example", 443, timeout=5.0)
    assert [round(timeout) for timeout in tried] == [5, 5, 2]  # the fourth address gets no time at all


def test_a_long_write_gets_only_the_time_the_attempt_has_left_slice_by_slice():
    deadline, sent = ClockedDeadline(), []

    class SlowReader(httpcore2.NetworkStream):
        def write(self, buffer, timeout=None):
            sent.append((len(buffer), timeout))
            deadline.spend(3)  # the server takes 3 s to read each slice

    stream = DeadlineStream(SlowReader(), deadline)
    with pytest.raises(httpcore2.WriteTimeout):
        stream.write(b"x" * upstream_http.WRITE_SLICE_BYTES * 5, timeout=5.0)
    slice_bytes = upstream_http.WRITE_SLICE_BYTES
    assert [(size, round(timeout)) for size, timeout in sent] == [(slice_bytes, 5), (slice_bytes, 5), (slice_bytes, 4),
                                                                   (slice_bytes, 1)]


def test_a_requests_headers_and_body_go_out_in_one_write_before_the_answer_is_read():
    writes = []

    class Recorder(httpcore2.NetworkStream):
        def write(self, buffer, timeout=None):
            writes.append(buffer)

        def read(self, max_bytes, timeout=None):
            return b"HTTP/1.1 200 OK\r\n"

    stream = DeadlineStream(Recorder(), Deadline())
    stream.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n", timeout=5.0)
    stream.write(b"{}", timeout=5.0)
    assert writes == []
    assert stream.read(1024, timeout=5.0) == b"HTTP/1.1 200 OK\r\n"
    assert writes == [b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"]


def test_a_name_lookup_gets_only_the_time_the_attempt_has_left(monkeypatch):
    released = threading.Event()

    def hanging_lookup(*args, **kwargs):
        released.wait(30)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(upstream_http.socket, "getaddrinfo", hanging_lookup)
    deadline = Deadline()
    deadline.at = time.monotonic() + 0.2
    try:
        with pytest.raises(httpcore2.ConnectTimeout, match="name lookup"):
            DeadlineBackend(deadline).connect_tcp("models.example", 443, timeout=5.0)
    finally:
        released.set()


def test_a_name_that_does_not_resolve_is_a_connect_error(monkeypatch):
    def no_such_name(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(upstream_http.socket, "getaddrinfo", no_such_name)
    deadline = Deadline()
    deadline.at = time.monotonic() + 5
    with pytest.raises(httpcore2.ConnectError, match="Name or service not known"):
        DeadlineBackend(deadline).connect_tcp("models.example", 443, timeout=5.0)
