"""Token budgets in Redis: one count for every instance, and what happens when Redis fails under load."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import create_app
from genapi.budget_periods import period_bounds
from genapi.budgets import RedisBudgetStore
from genapi.keys import Client
from genapi.redis_state import RedisState
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.fake_openai import HOLD
from tests.test_budgets import PROMPT, REAL_USAGE, RESERVED, call_generate, counts
from tests.test_redis import refuse_writes_as_a_replica, refuse_writes_by_maxmemory


@pytest.fixture
def budget_app(fake_openai):
    def build(**overrides):
        settings = {"token_budget": "1000/day", "openai_base_url": fake_openai.base_url} | overrides
        app = create_app(make_settings(**settings))
        app.config["TESTING"] = True
        return app

    return build


def test_two_instances_share_one_budget_through_redis(budget_app, redis_settings):
    budget = RESERVED + REAL_USAGE - 1  # after one request, one token short of another
    first, second = (budget_app(token_budget=f"{budget}/day", **redis_settings) for _ in range(2))
    assert call_generate(first.test_client()).status_code == 200
    refused = call_generate(second.test_client())
    assert (refused.status_code, refused.headers["X-Budget-Remaining"]) == (429, str(budget - REAL_USAGE))
    assert counts(second) == (REAL_USAGE, 0)


def test_a_redis_reservation_whose_process_died_is_charged_in_full_once(redis_settings):
    store = RedisBudgetStore(RedisState(redis_settings["redis_url"], redis_settings["redis_key_prefix"]))
    key = f"{redis_settings['redis_key_prefix']}budget:test"
    store.reserve(key, "abandoned:50", 50, 100, lapses_at=time.time() - 1, ttl=3600, force=False)
    assert store.reserve(key, "next:10", 10, 100, lapses_at=time.time() + 60, ttl=3600, force=False) == (1, 50, 10)
    assert store.settle(key, "abandoned:50", 5) == (50, 10)
    assert store.settle(key, "next:10", 7) == (57, 0)
    assert store.settle(key, "next:10", 7) == (57, 0)


def test_redis_down_refuses_calls_to_the_model_with_503_budget_unavailable(budget_app, fake_openai, private_redis):
    client = budget_app(redis_url=private_redis.url).test_client()
    private_redis.stop()
    response = call_generate(client)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "budget_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert fake_openai.calls == 0
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "budget_unavailable" in ready.get_json()["error"]["message"]


def test_redis_down_with_budgets_open_counts_in_this_process(budget_app, private_redis):
    budget = RESERVED + REAL_USAGE - 1
    app = budget_app(redis_url=private_redis.url, token_budget=f"{budget}/day", token_budget_on_redis_error="open")
    client = app.test_client()
    private_redis.stop()
    assert [call_generate(client).status_code for _ in range(2)] == [200, 429]
    assert app.extensions["genapi"]["budgets"].memory.counts(budget_key(app)) == (REAL_USAGE, 0)
    assert "counted in each process" in client.get("/readyz").get_json()["error"]["message"]


def test_shadow_mode_refuses_nothing_while_redis_is_down(budget_app, private_redis):
    client = budget_app(redis_url=private_redis.url, token_budget="1/day", token_budget_mode="shadow").test_client()
    private_redis.stop()
    assert call_generate(client).status_code == 200


def budget_key(app) -> str:
    """The Redis key (and the in-process one) of alice's budget this period."""
    budgets = app.extensions["genapi"]["budgets"]
    budget = budgets.of(Client("alice"))
    return budgets.key("alice", budget, period_bounds(budget.period, time.time())[0])


@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.parametrize("refuse_writes", [refuse_writes_by_maxmemory, refuse_writes_as_a_replica])
def test_redis_refusing_writes_under_load_never_overruns_nor_answers_500(
    budget_app, fake_openai, private_redis, refuse_writes, mode
):
    app = budget_app(redis_url=private_redis.url, token_budget_on_redis_error=mode, rate_limit="1000/minute")
    in_flight = 5
    fake_openai.then(*[HOLD] * in_flight)
    statuses: list[int] = []
    lock = threading.Lock()

    def call(_):
        response = app.test_client().post("/generate", json={"prompt": PROMPT, "max_tokens": 50},
                                          headers={"X-API-KEY": USER_KEY})
        with lock:
            statuses.append((response.status_code, (response.get_json().get("error") or {}).get("code")))

    with ThreadPoolExecutor(max_workers=20) as pool:
        held = [pool.submit(call, n) for n in range(in_flight)]
        assert fake_openai.wait_for_in_flight(in_flight)
        refuse_writes(private_redis)  # with five reservations held in Redis
        more = [pool.submit(call, n) for n in range(10)]
        for future in more:
            future.result()
        fake_openai.release()
        for future in held:
            future.result()
    assert all(status != 500 for status, _ in statuses)
    assert statuses.count((200, None)) == in_flight + (10 if mode == "open" else 0)
    assert statuses.count((503, "budget_unavailable")) == (10 if mode == "closed" else 0)
    # The held reservations could not be settled: Redis keeps them charged in full, never less, never over.
    spent, held_tokens = counts_in(private_redis, app)
    assert (spent, held_tokens) == (0, in_flight * RESERVED)


def counts_in(private_redis, app) -> tuple[int, int]:
    spent, held = private_redis.client().hmget(budget_key(app), "spent", "held")
    return int(spent or 0), int(held or 0)


def test_reserve_and_settle_are_one_script_call_each(budget_app, private_redis):
    client = budget_app(redis_url=private_redis.url, admin_token_budget="none").test_client()
    call_generate(client)  # loads the scripts into Redis

    def script_calls(key) -> int:
        """EVALSHA calls in Redis during one request; the rate limit's moving window makes some of its own."""
        before = private_redis.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        assert call_generate(client, key=key).status_code == 200
        return private_redis.client().info("commandstats")["cmdstat_evalsha"]["calls"] - before

    without_budget = script_calls(ADMIN_KEY)
    assert script_calls(USER_KEY) == without_budget + 2
