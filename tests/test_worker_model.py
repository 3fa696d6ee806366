"""The Procfile's service holds many slow upstream calls at once on synchronous code, and shuts down gracefully."""

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import USER_KEY


def post_generate(url: str) -> int:
    body = json.dumps({"prompt": "Tell me a joke.", "max_tokens": 20}).encode()
    headers = {"Content-Type": "application/json", "X-API-KEY": USER_KEY}
    request = urllib.request.Request(f"{url}/generate", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def serves_a_new_connection(port: int) -> bool:
    """Whether a new connection to the port is accepted and answered; refused, reset or unanswered is False."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_upstream_calls_run_concurrently_not_one_per_worker(start_fake_openai, start_procfile_service, worker_class):
    upstream = start_fake_openai(delay=1)
    service = start_procfile_service(upstream.base_url, WORKER_CLASS=worker_class)
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(post_generate, [service.url] * 20))
    assert statuses == [200] * 20
    assert upstream.max_in_flight == 20  # two workers, so at least ten calls at once in each


def test_sigterm_finishes_every_in_flight_request_and_accepts_no_new_connection(
    start_fake_openai, start_procfile_service
):
    upstream = start_fake_openai(delay=3)
    service = start_procfile_service(upstream.base_url)
    with ThreadPoolExecutor(50) as pool:
        answers = [pool.submit(post_generate, service.url) for _ in range(50)]
        assert upstream.wait_for_in_flight(50), "the 50 requests were never all in flight"
        service.process.send_signal(signal.SIGTERM)
        # A worker notices SIGTERM within a second and closes its listener; the 50 calls still have ~2 s to go.
        refused = False
        while not refused and upstream.in_flight == 50:
            refused = not serves_a_new_connection(service.port)
            time.sleep(0.05)  # a poll interval, not a wait for an event
        statuses = [answer.result() for answer in answers]
    assert refused, "a new connection was still served while the in-flight requests finished"
    assert statuses == [200] * 50
    assert service.process.wait(30) == 0


def test_idle_connection_checks_use_the_c_poll_under_gevent_and_still_see_a_closed_socket(monkeypatch):
    import select

    import httpcore2._utils
    from gevent import monkey

    from genapi.upstream_http import probe_idle_connections_without_gevent

    monkeypatch.setattr(httpcore2._utils, "select", select)  # restored after the test
    monkeypatch.setattr(monkey, "is_module_patched", lambda name: name == "select")
    probe_idle_connections_without_gevent()
    assert httpcore2._utils.select.poll is monkey.get_original("select", "poll")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not httpcore2._utils.is_socket_readable(ours)  # idle and open: reusable
        theirs.close()  # the server hung up
        assert httpcore2._utils.is_socket_readable(ours)
