"""No key, the client's or the upstream's, reaches a log line, a response body or a repr."""

import logging

import httpx2

from tests.conftest import UPSTREAM_KEY, USER_KEY
from tests.test_upstream import drop, timeout, upstream_error


def test_no_key_appears_in_logs_or_responses_across_successes_and_failures(app, generate, client, upstream, caplog):
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx2's own debug logs included
    caplog.set_level(logging.DEBUG, logger="httpx2")
    upstream.then(
        upstream_error(401, f"Incorrect API key provided: {UPSTREAM_KEY}"),
        upstream_error(400, f"bad request, and here is your key: {UPSTREAM_KEY}"),
        upstream_error(500),
        upstream_error(429),
        timeout,
        drop,
        httpx2.Response(200, content=b"not json"),
    )
    bodies = [generate().get_data(as_text=True) for _ in range(8)]
    bodies.append(client.post("/generate", json={"prompt": "x"}, headers={"X-API-KEY": USER_KEY + "x"}).get_data(True))
    bodies.append(client.post(f"/generate?api_key={USER_KEY}", json={"prompt": "x"}).get_data(as_text=True))
    logged = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert len(caplog.records) > 0
    for secret in (USER_KEY, UPSTREAM_KEY):
        assert secret not in logged
        assert not any(secret in body for body in bodies)


def test_app_state_reprs_hide_keys(app):
    state = app.extensions["genapi"]
    for secret in (USER_KEY, UPSTREAM_KEY):
        assert secret not in repr(state)
