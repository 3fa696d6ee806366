"""Rate limits: RATE_LIMIT per key with X-RateLimit-* headers, batches cost one per prompt, admins' own limit,
AUTH_FAILURE_LIMIT and INVALID_REQUEST_LIMIT per address (X-Forwarded-For only through TRUSTED_PROXIES), all in one
process's memory."""

import time

import pytest

from config import load_settings
from tests.conftest import ADMIN_KEY, USER_KEY


def post(client, key=USER_KEY, path="/generate", address="10.0.0.1", headers=None, **body):
    body = body or {"prompt": "hi"}
    headers = ({"X-API-KEY": key} if key else {}) | (headers or {})
    return client.post(path, json=body, headers=headers, environ_base={"REMOTE_ADDR": address})


def test_requests_over_the_key_limit_get_429_in_the_error_shape_with_retry_after(make_app, upstream):
    client = make_app(rate_limit="3/minute").test_client()
    assert [post(client).status_code for _ in range(3)] == [200, 200, 200]
    refused = post(client)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert upstream.calls == 3


def test_successful_answers_carry_limit_remaining_and_reset(make_app):
    client = make_app(rate_limit="5/minute").test_client()
    first, second = post(client), post(client)
    assert first.headers["X-RateLimit-Limit"] == "5"
    assert first.headers["X-RateLimit-Remaining"] == "4"
    assert second.headers["X-RateLimit-Remaining"] == "3"
    assert 0 < int(first.headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert "Retry-After" not in first.headers


def test_429_carries_the_rate_limit_headers(make_app):
    client = make_app(rate_limit="1/minute").test_client()
    post(client)
    refused = post(client)
    assert refused.headers["X-RateLimit-Limit"] == "1"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in refused.headers


def test_every_limit_of_a_rate_limit_with_two_holds(make_app, upstream):
    client = make_app(rate_limit="100/second;2/minute").test_client()
    responses = [post(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert "2 per 1 minute" in responses[2].get_json()["error"]["message"]
    assert responses[1].headers["X-RateLimit-Limit"] == "2"  # the limit nearest to refusing
    assert responses[1].headers["X-RateLimit-Remaining"] == "0"
    assert upstream.calls == 2


def test_a_request_refused_by_one_of_two_limits_costs_nothing_in_the_other(make_app):
    app = make_app(rate_limit="1/minute;5/hour")
    client = app.test_client()
    assert [post(client).status_code for _ in range(4)] == [200, 429, 429, 429]
    rate_limits = app.extensions["genapi"]["limits"]
    hour = next(limit for limit in rate_limits.user if limit.amount == 5)
    assert rate_limits.window(hour, "alice", "per-key")[2] == 4  # only the answered request counted


def test_each_key_has_its_own_bucket(make_app):
    client = make_app(rate_limit="1/minute", api_keys=f"alice:{USER_KEY},bob:bobs-key").test_client()
    assert post(client).status_code == 200
    assert post(client, key="bobs-key").status_code == 200
    assert post(client).status_code == 429


def test_the_limit_follows_the_key_not_the_address(make_app):
    client = make_app(rate_limit="1/minute").test_client()
    assert post(client, address="10.0.0.1").status_code == 200
    assert post(client, address="10.0.0.2").status_code == 429


def test_a_refused_request_does_not_reach_the_upstream_or_change_the_count(make_app, upstream):
    client = make_app(rate_limit="2/minute").test_client()
    post(client), post(client), post(client), post(client)
    assert upstream.calls == 2


def test_invalid_bodies_are_not_counted(make_app):
    client = make_app(rate_limit="1/minute").test_client()
    assert post(client, prompt="").status_code == 422
    assert post(client).status_code == 200


def test_a_batch_costs_one_request_per_prompt(make_app):
    client = make_app(rate_limit="5/minute").test_client()
    response = post(client, path="/generate/batch", prompts=["a", "b", "c"])
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "2"


def test_a_batch_larger_than_what_is_left_is_refused_whole_and_costs_nothing(make_app, upstream):
    client = make_app(rate_limit="3/minute").test_client()
    post(client)
    refused = post(client, path="/generate/batch", prompts=["a", "b", "c"])
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert upstream.calls == 1
    assert post(client, path="/generate/batch", prompts=["a", "b"]).status_code == 200


def test_admins_share_rate_limit_by_default(make_app):
    client = make_app(rate_limit="1/minute").test_client()
    assert post(client, key=ADMIN_KEY).status_code == 200
    assert post(client, key=ADMIN_KEY).status_code == 429


def test_admin_rate_limit_gives_admins_their_own_limit(make_app):
    client = make_app(rate_limit="1/minute", admin_rate_limit="3/minute").test_client()
    assert [post(client, key=ADMIN_KEY).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [post(client).status_code for _ in range(2)] == [200, 429]


def test_admin_rate_limit_none_leaves_admins_unlimited(make_app):
    client = make_app(rate_limit="1/minute", admin_rate_limit="none").test_client()
    responses = [post(client, key=ADMIN_KEY) for _ in range(5)]
    assert all(r.status_code == 200 for r in responses)
    assert "X-RateLimit-Limit" not in responses[0].headers


def test_failed_authentications_from_one_address_are_limited(make_app, upstream):
    client = make_app(auth_failure_limit="3/minute").test_client()
    assert [post(client, key="wrong").status_code for _ in range(3)] == [403, 403, 403]
    refused = post(client, key="wrong")
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_auth_failures"
    assert int(refused.headers["Retry-After"]) >= 1


def test_missing_keys_count_as_failed_authentications(make_app):
    client = make_app(auth_failure_limit="2/minute").test_client()
    assert [post(client, key=None).status_code for _ in range(3)] == [401, 401, 429]


def test_an_address_over_the_failure_limit_is_refused_even_with_a_right_key(make_app, upstream):
    # Otherwise a guesser would still learn which guess was right.
    client = make_app(auth_failure_limit="2/minute").test_client()
    post(client, key="wrong"), post(client, key="wrong")
    assert post(client).status_code == 429
    assert upstream.calls == 0


def test_successful_authentications_do_not_count_as_failures(make_app):
    client = make_app(auth_failure_limit="2/minute").test_client()
    assert all(post(client).status_code == 200 for _ in range(5))
    assert post(client, key="wrong").status_code == 403


def test_failure_limit_is_per_address(make_app):
    client = make_app(auth_failure_limit="1/minute").test_client()
    post(client, key="wrong", address="10.0.0.1")
    assert post(client, address="10.0.0.1").status_code == 429
    assert post(client, address="10.0.0.2").status_code == 200


def test_x_forwarded_for_is_ignored_without_trusted_proxies(make_app):
    client = make_app(auth_failure_limit="1/minute").test_client()
    post(client, key="wrong", headers={"X-Forwarded-For": "1.1.1.1"})
    # A client cannot escape its count by claiming another address.
    assert post(client, headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 429


def test_x_forwarded_for_names_the_client_behind_trusted_proxies(make_app):
    client = make_app(auth_failure_limit="1/minute", trusted_proxies=1).test_client()
    post(client, key="wrong", headers={"X-Forwarded-For": "1.1.1.1"})
    assert post(client, headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 429
    assert post(client, headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 200


def test_the_docs_page_is_never_limited(make_app):
    client = make_app(auth_failure_limit="1/minute").test_client()
    post(client, key="wrong")
    assert post(client, key="wrong").status_code == 429
    assert client.get("/docs/", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200
    assert client.get("/", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 302


def test_health_and_readiness_are_never_limited(make_app):
    client = make_app(auth_failure_limit="1/minute").test_client()
    post(client, key="wrong"), post(client, key="wrong")
    assert client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200
    assert client.get("/readyz", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200


@pytest.mark.parametrize("variable", ["RATE_LIMIT", "AUTH_FAILURE_LIMIT", "ADMIN_RATE_LIMIT", "INVALID_REQUEST_LIMIT"])
def test_a_malformed_limit_stops_start_up_naming_it(variable, monkeypatch, capsys):
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv(variable, "lots per fortnight")
    with pytest.raises(SystemExit):
        load_settings(_env_file=None)
    assert f"{variable}:" in capsys.readouterr().err


@pytest.mark.parametrize("forged", ["x" * 8000, "not-an-address", "1.1.1.1 ; DROP"])
def test_a_forwarded_address_that_is_not_an_ip_counts_as_the_proxys_own(make_app, forged):
    client = make_app(auth_failure_limit="1/minute", trusted_proxies=1).test_client()
    post(client, key="wrong", address="10.0.0.9", headers={"X-Forwarded-For": forged})
    # Another made-up value is the same bucket, the proxy's: a forger cannot pick a bucket, or a Redis key, of its own.
    assert post(client, address="10.0.0.9", headers={"X-Forwarded-For": forged + "y"}).status_code == 429
    assert post(client, address="10.0.0.9", headers={"X-Forwarded-For": "3.3.3.3"}).status_code == 200


def test_requests_refused_for_their_body_count_against_invalid_request_limit(make_app, upstream):
    client = make_app(invalid_request_limit="2/minute").test_client()
    assert [post(client, prompt="").status_code, post(client, max_tokens="ten", prompt="x").status_code] == [422, 422]
    refused = post(client)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_invalid_requests"
    assert int(refused.headers["Retry-After"]) >= 1
    assert post(client, address="10.0.0.2").status_code == 200
    assert upstream.calls == 1


def test_valid_requests_do_not_count_against_invalid_request_limit(make_app):
    client = make_app(invalid_request_limit="1/minute").test_client()
    assert [post(client).status_code for _ in range(3)] == [200, 200, 200]
