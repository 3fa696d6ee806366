"""Against a real Redis: limits and the cache shared by app instances, readiness, and Redis going away mid-run."""

import logging
import os
import subprocess
import sys
import time

import pytest
import redis

from app import create_app
from genapi.redis_state import connect, masked_url
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.procfile import ROOT, free_port


def post(client, key=USER_KEY, **body):
    return client.post("/generate", json={"prompt": "hi"} | body, headers={"X-API-KEY": key})


def test_two_app_instances_share_one_count_through_redis(make_app, redis_settings):
    first, second = (make_app(rate_limit="4/minute", **redis_settings).test_client() for _ in range(2))
    statuses = [post(client).status_code for client in (first, second, first, second, first, second)]
    assert statuses == [200, 200, 200, 200, 429, 429]


def test_without_redis_each_instance_counts_for_itself(make_app):
    first, second = (make_app(rate_limit="1/minute").test_client() for _ in range(2))
    assert [post(first).status_code, post(second).status_code] == [200, 200]


def test_without_redis_url_the_service_never_loads_the_redis_client(tmp_path):
    # gunicorn's master loads the app and every worker forks from it: what it imports is in every process.
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import sys, app\n"
        "client = app.app.test_client()\n"
        "ok = client.post('/generate', json={'prompt': 'hi'}, headers={'X-API-KEY': 'k-0123456789abcdef'}).status_code\n"
        "wrong = client.post('/generate', json={'prompt': 'hi'}, headers={'X-API-KEY': 'wrong-key-000000'}).status_code\n"
        "invalid = client.post('/generate', json={}, headers={'X-API-KEY': 'k-0123456789abcdef'}).status_code\n"
        "print(ok, wrong, invalid, any(name.startswith('redis.') for name in sys.modules))\n"
    )
    env = os.environ | {"API_KEYS": "k-0123456789abcdef", "LLM_PROVIDER": "mock", "TOKEN_BUDGET": "1000/day",
                        "DATABASE_URL": f"sqlite:///{tmp_path}/genapi.sqlite3"}  # fmt: skip
    env.pop("REDIS_URL", None)
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert finished.stdout.splitlines()[-1].split() == ["200", "403", "422", "False"]  # after the log lines


def test_the_failed_authentication_count_is_shared_through_redis(make_app, redis_settings):
    first, second = (make_app(auth_failure_limit="2/minute", **redis_settings).test_client() for _ in range(2))
    post(first, key="wrong"), post(second, key="wrong")
    assert post(first).status_code == 429


def test_the_redis_cache_is_shared_by_instances_and_scoped_per_key(make_app, upstream, redis_settings):
    first, second = (make_app(cache_ttl=60, **redis_settings).test_client() for _ in range(2))
    assert post(first).headers["X-Cache"] == "MISS"
    hit = post(second)
    assert (hit.headers["X-Cache"], hit.get_json()["cached"]) == ("HIT", True)
    assert post(second, key=ADMIN_KEY).headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_redis_cache_entries_are_json_under_the_prefix_with_the_ttl(make_app, redis_settings, shared_redis_url):
    post(make_app(cache_ttl=60, **redis_settings).test_client())
    connection = redis.Redis.from_url(shared_redis_url)
    keys = cache_entries(connection, redis_settings)
    assert len(keys) == 1
    assert 0 < connection.ttl(keys[0]) <= 60
    assert b'"response"' in connection.get(keys[0])


def test_redis_cache_entries_expire_after_cache_ttl(make_app, upstream, redis_settings):
    client = make_app(cache_ttl=1, **redis_settings).test_client()
    post(client)
    time.sleep(1.1)  # Redis expires the key on its own clock: the one test that waits for it
    assert post(client).headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_no_cache_refreshes_the_redis_entry(make_app, upstream, redis_settings):
    client = make_app(cache_ttl=60, **redis_settings).test_client()
    post(client)
    headers = {"X-API-KEY": USER_KEY, "Cache-Control": "no-cache"}
    fresh = client.post("/generate", json={"prompt": "hi"}, headers=headers)
    assert fresh.headers["X-Cache"] == "MISS"
    assert post(client).get_json()["usage"] == fresh.get_json()["usage"]
    assert upstream.calls == 2


def test_readyz_is_200_when_redis_answers(make_app, redis_settings):
    response = make_app(**redis_settings).test_client().get("/readyz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ready"})


def test_readyz_is_200_without_redis(client):
    assert client.get("/readyz").get_json() == {"status": "ready"}


def test_readyz_makes_no_upstream_call_and_needs_no_key(client, upstream):
    assert client.get("/readyz").status_code == 200
    assert upstream.calls == 0


def test_redis_going_away_mid_run_causes_no_500_and_readyz_says_why(make_app, upstream, private_redis, caplog):
    caplog.set_level(logging.INFO)
    client = make_app(rate_limit="5/minute", cache_ttl=60, redis_url=private_redis.url).test_client()
    assert [post(client, prompt=f"p{n}").status_code for n in range(2)] == [200, 200]
    private_redis.stop()
    statuses = [post(client, prompt=f"q{n}").status_code for n in range(6)]
    # Fail open to this process's own count: the key gets its full limit again, then 429, never a 500.
    assert statuses == [200, 200, 200, 200, 200, 429]
    assert post(client, key="wrong").status_code == 403
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["error"]["code"] == "redis_unavailable"
    assert "Redis" in ready.get_json()["error"]["message"]
    assert "Redis at redis://:***@127.0.0.1" in caplog.text
    assert private_redis.PASSWORD not in caplog.text


def test_a_redis_outage_makes_every_cache_lookup_a_miss(make_app, upstream, private_redis):
    client = make_app(cache_ttl=60, redis_url=private_redis.url).test_client()
    post(client)
    private_redis.stop()
    response = post(client)
    assert (response.status_code, response.headers["X-Cache"]) == (200, "MISS")
    assert upstream.calls == 2


def test_a_redis_that_is_down_at_start_up_still_serves(upstream, private_redis):
    private_redis.stop()
    app = create_app(make_settings(redis_url=private_redis.url, cache_ttl=60), http_client=upstream.http_client())
    client = app.test_client()
    assert post(client).status_code == 200
    assert client.get("/readyz").status_code == 503


def test_masked_url_hides_the_password():
    assert masked_url("rediss://:pw@example.com:6380/0") == "rediss://:***@example.com:6380/0"
    assert masked_url("redis://user:pw@example.com") == "redis://user:***@example.com"
    assert masked_url("redis://localhost:6379") == "redis://localhost:6379"


def test_rediss_skips_certificate_verification_as_heroku_redis_needs():
    kwargs = connect("rediss://:pw@example.com:6380").connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] is None


def test_rediss_verification_can_be_asked_for_in_the_url():
    kwargs = connect("rediss://:pw@example.com:6380?ssl_cert_reqs=required").connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required"


def test_redis_url_password_is_in_no_repr(make_app, private_redis):
    app = make_app(redis_url=private_redis.url, cache_ttl=60)
    assert private_redis.PASSWORD not in repr(app.extensions["genapi"])
    assert private_redis.PASSWORD not in repr(app.extensions["genapi"]["settings"])


def test_masked_url_leaves_out_a_query_that_may_hold_a_password():
    assert masked_url("redis://example.com:6379/0?password=pw") == "redis://example.com:6379/0"


def test_a_redis_cache_value_that_is_not_json_is_a_miss(make_app, upstream, redis_settings, shared_redis_url):
    client = make_app(cache_ttl=60, **redis_settings).test_client()
    post(client)
    connection = redis.Redis.from_url(shared_redis_url)
    (key,) = connection.scan_iter(match=f"{redis_settings['redis_key_prefix']}cache:*")
    connection.set(key, b"not json")
    response = post(client)
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_readyz_says_service_unavailable_not_upstream_when_redis_is_down(make_app, private_redis):
    client = make_app(redis_url=private_redis.url, redis_key_prefix="genapi-readyz:").test_client()
    private_redis.stop()
    error = client.get("/readyz").get_json()["error"]
    assert error["code"] == "redis_unavailable"
    assert error["type"] == "service_unavailable"


def refuse_writes_by_maxmemory(server) -> None:
    """Heroku Redis's default: at maxmemory under noeviction every write is refused with OOM; reads still work."""
    server.client().config_set("maxmemory-policy", "noeviction")
    server.client().config_set("maxmemory", 1)


def refuse_writes_as_a_replica(server) -> None:
    """A read-only replica of a master that is not there: it answers PING and reads, and refuses every write."""
    server.client().replicaof("127.0.0.1", free_port())


@pytest.mark.parametrize("refuse_writes", [refuse_writes_by_maxmemory, refuse_writes_as_a_replica])
def test_a_redis_that_refuses_writes_falls_back_to_per_process_counts(make_app, private_redis, refuse_writes):
    client = make_app(rate_limit="3/minute", redis_url=private_redis.url).test_client()
    refuse_writes(private_redis)
    assert [post(client, prompt=f"p{n}").status_code for n in range(4)] == [200, 200, 200, 429]


@pytest.mark.parametrize("refuse_writes", [refuse_writes_by_maxmemory, refuse_writes_as_a_replica])
def test_failed_authentications_are_counted_when_redis_refuses_writes(make_app, private_redis, refuse_writes):
    client = make_app(auth_failure_limit="2/minute", redis_url=private_redis.url).test_client()
    refuse_writes(private_redis)
    assert [post(client, key="wrong").status_code for _ in range(3)] == [403, 403, 429]


@pytest.mark.parametrize("refuse_writes", [refuse_writes_by_maxmemory, refuse_writes_as_a_replica])
def test_readyz_reports_a_redis_that_refuses_writes(make_app, private_redis, refuse_writes):
    client = make_app(redis_url=private_redis.url).test_client()
    refuse_writes(private_redis)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "redis_unavailable"
    assert "refuses writes" in response.get_json()["error"]["message"]


def test_a_redis_that_refuses_writes_is_logged_once_and_its_return_once(make_app, private_redis, caplog):
    caplog.set_level(logging.INFO)
    client = make_app(rate_limit="50/minute", cache_ttl=60, redis_url=private_redis.url).test_client()
    refuse_writes_by_maxmemory(private_redis)
    for n in range(3):
        post(client, prompt=f"p{n}"), post(client, key="wrong"), client.get("/readyz")
    private_redis.client().config_set("maxmemory", 0)
    assert client.get("/readyz").status_code == 200
    assert caplog.text.count("is not answering or refuses writes (OutOfMemoryError") == 1
    assert caplog.text.count("answers again") == 1
    assert private_redis.PASSWORD not in caplog.text


def cache_entries(connection, redis_settings) -> list:
    return list(connection.scan_iter(match=f"{redis_settings['redis_key_prefix']}cache:*"))


def test_the_redis_cache_keeps_at_most_cache_max_entries_dropping_the_oldest(
    make_app, upstream, redis_settings, shared_redis_url
):
    client = make_app(cache_ttl=60, cache_max_entries=2, **redis_settings).test_client()
    for prompt in ("one", "two", "three"):
        post(client, prompt=prompt)
    assert len(cache_entries(redis.Redis.from_url(shared_redis_url), redis_settings)) == 2
    assert [post(client, prompt=p).headers["X-Cache"] for p in ("three", "two", "one")] == ["HIT", "HIT", "MISS"]


def test_the_redis_cache_does_not_store_an_answer_over_cache_max_entry_bytes(
    make_app, upstream, redis_settings, shared_redis_url
):
    client = make_app(cache_ttl=60, cache_max_entry_bytes=1024, **redis_settings).test_client()
    post(client, prompt="word " * 400, max_tokens=1000)
    assert cache_entries(redis.Redis.from_url(shared_redis_url), redis_settings) == []


def test_while_redis_refuses_writes_requests_do_not_each_try_it_again(make_app, private_redis, monkeypatch):
    client = make_app(rate_limit="50/minute", cache_ttl=60, redis_url=private_redis.url).test_client()
    state = client.application.extensions["genapi"]["redis"]
    refuse_writes_by_maxmemory(private_redis)
    post(client, prompt="first")
    probes = []
    monkeypatch.setattr(state, "problem", lambda: probes.append(1))
    for n in range(5):
        assert post(client, prompt=f"p{n}").status_code == 200
    assert probes == []  # the next try waits its few seconds; until then Redis is not asked at all
