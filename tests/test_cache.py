"""The response cache in memory: hit, miss, Cache-Control: no-cache, expiry, per-key scope, successes only."""

from genapi.cache import MemoryCache, cache_key
from genapi.providers import Generation
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.test_upstream import upstream_error


def post(client, key=USER_KEY, headers=None, **body):
    body = {"prompt": "Tell me a joke."} | body
    return client.post("/generate", json=body, headers={"X-API-KEY": key} | (headers or {}))


def test_a_repeated_request_is_answered_from_the_cache(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    first, second = post(client), post(client)
    assert (first.headers["X-Cache"], first.get_json()["cached"]) == ("MISS", False)
    assert (second.headers["X-Cache"], second.get_json()["cached"]) == ("HIT", True)
    assert second.get_json()["response"] == first.get_json()["response"]
    assert upstream.calls == 1


def test_a_cached_answer_carries_this_requests_id(make_app):
    client = make_app(cache_ttl=60).test_client()
    post(client, headers={"X-Request-ID": "first"})
    second = post(client, headers={"X-Request-ID": "second"})
    assert second.get_json()["id"] == "second"


def test_any_different_field_is_a_miss(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    post(client)
    for change in ({"prompt": "Another."}, {"max_tokens": 7}, {"temperature": 0.5}, {"system": "Be brief."}):
        assert post(client, **change).headers["X-Cache"] == "MISS"
    assert post(client, model="other-model").headers["X-Cache"] == "MISS"
    assert upstream.calls == 6


def test_another_key_never_reads_an_entry_it_did_not_store(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    post(client)
    other = post(client, key=ADMIN_KEY)
    assert other.headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_cache_control_no_cache_forces_a_fresh_call_and_stores_it(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    post(client)
    fresh = post(client, headers={"Cache-Control": "no-cache"})
    assert (fresh.headers["X-Cache"], fresh.get_json()["cached"]) == ("MISS", False)
    assert upstream.calls == 2
    assert post(client).get_json()["usage"] == fresh.get_json()["usage"]
    assert upstream.calls == 2


def test_failures_are_not_cached(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    upstream.then(upstream_error(500))
    assert post(client).status_code == 502
    assert post(client).headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_cache_is_off_by_default(client, upstream):
    post(client)
    second = post(client)
    assert second.get_json()["cached"] is False
    assert "X-Cache" not in second.headers
    assert upstream.calls == 2


def test_memory_cache_entries_expire_after_the_ttl():
    now = [1000.0]
    cache = MemoryCache(ttl=60, max_entries=10, max_bytes=10**6, max_entry_bytes=10**5, clock=lambda: now[0])
    cache.put("k", {"response": "x"})
    now[0] += 59
    assert cache.get("k") == {"response": "x"}
    now[0] += 2
    assert cache.get("k") is None


def test_memory_cache_keeps_at_most_max_entries_dropping_the_least_recently_used():
    cache = MemoryCache(ttl=60, max_entries=2, max_bytes=10**6, max_entry_bytes=10**5)
    cache.put("a", {"n": 1}), cache.put("b", {"n": 2})
    cache.get("a")
    cache.put("c", {"n": 3})
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ({"n": 1}, None, {"n": 3})


def test_cache_max_entries_bounds_the_apps_cache(make_app, upstream):
    client = make_app(cache_ttl=60, cache_max_entries=1).test_client()
    post(client, prompt="one"), post(client, prompt="two")
    assert post(client, prompt="one").headers["X-Cache"] == "MISS"


def test_cache_key_covers_the_client_and_every_field():
    base = Generation(prompt="p", model="m", max_tokens=5, temperature=None, system=None)
    variants = [
        Generation(prompt="q", model="m", max_tokens=5),
        Generation(prompt="p", model="n", max_tokens=5),
        Generation(prompt="p", model="m", max_tokens=6),
        Generation(prompt="p", model="m", max_tokens=5, temperature=0.0),
        Generation(prompt="p", model="m", max_tokens=5, system=""),
    ]
    keys = {cache_key("alice", base), cache_key("bob", base)} | {cache_key("alice", v) for v in variants}
    assert len(keys) == 7


def test_a_cache_hit_still_counts_against_the_rate_limit(make_app):
    client = make_app(cache_ttl=60, rate_limit="2/minute").test_client()
    assert [post(client).status_code for _ in range(3)] == [200, 200, 429]


def test_a_cached_body_has_the_fields_of_a_fresh_one_in_the_same_order(make_app):
    client = make_app(cache_ttl=60).test_client()
    fresh, hit = post(client).get_json(), post(client).get_json()
    assert list(hit) == list(fresh) == ["response", "model", "finish_reason", "usage", "id", "cached"]
    assert {k: v for k, v in hit.items() if k not in ("id", "cached")} == {
        k: v for k, v in fresh.items() if k not in ("id", "cached")
    }


def test_memory_cache_is_bounded_in_bytes_dropping_the_least_recently_used():
    cache = MemoryCache(ttl=60, max_entries=1000, max_bytes=50_000, max_entry_bytes=20_000)
    for n in range(10):
        cache.put(f"k{n}", {"response": "x" * 15_000})
    kept = [n for n in range(10) if cache.get(f"k{n}")]
    assert kept == [7, 8, 9]


def test_an_answer_over_cache_max_entry_bytes_is_not_cached(make_app, upstream):
    client = make_app(cache_ttl=60, cache_max_entry_bytes=1024).test_client()
    long_prompt = "word " * 400  # the fake upstream echoes it: an answer of some 2 KB
    assert [post(client, prompt=long_prompt, max_tokens=1000).headers["X-Cache"] for _ in range(2)] == ["MISS", "MISS"]
    assert post(client).headers["X-Cache"] == "MISS"
    assert post(client).headers["X-Cache"] == "HIT"
