"""Token budgets in one process: every path that calls the model reserves, settles to the real usage, or releases."""

import json
import logging
import time
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from app import create_app
from genapi.budget_periods import Budget, period_bounds
from genapi.budgets import MemoryBudgetStore, prompt_tokens_estimate
from genapi.keys import Client
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.fake_openai import Status, Stream
from tests.test_metrics import sample

PROMPT = "Tell me a joke."  # 4 words; the fake answers "echo: Tell me a joke.", 5 words: 9 tokens in all
REAL_USAGE = 9
# What one request with PROMPT and max_tokens 50 reserves: 15 characters -> 4 tokens, one message's framing, 50.
RESERVED = prompt_tokens_estimate(len(PROMPT)) + 50
FAST_STREAMS = {"stream_heartbeat_seconds": 0.1, "stream_first_token_timeout": 5, "stream_idle_timeout": 5}


@pytest.fixture
def budget_app(fake_openai):
    """An app on the loopback fake upstream with a token budget; keyword arguments override settings."""

    def build(**overrides):
        settings = {"token_budget": "1000/day", "openai_base_url": fake_openai.base_url} | FAST_STREAMS | overrides
        app = create_app(make_settings(**settings))
        app.config["TESTING"] = True
        return app

    return build


def call_generate(client, key=USER_KEY, **body):
    return client.post("/generate", json={"prompt": PROMPT, "max_tokens": 50} | body, headers={"X-API-KEY": key})


def call_generate_stream(client, key=USER_KEY, **body):
    return call_generate(client, key, stream=True, **body)


def call_batch(client, key=USER_KEY, **body):
    return client.post("/generate/batch", json={"prompts": [PROMPT], "max_tokens": 50} | body,
                       headers={"X-API-KEY": key})


def call_chat(client, key=USER_KEY, **body):
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 50} | body
    return client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})


def call_chat_stream(client, key=USER_KEY, **body):
    return call_chat(client, key, stream=True, **body)


PATHS = {
    "generate": call_generate,
    "generate-stream": call_generate_stream,
    "batch": call_batch,
    "v1": call_chat,
    "v1-stream": call_chat_stream,
}


def counts(app, name="alice") -> tuple[int, int]:
    """(spent, held) of the client's budget this period."""
    budgets = app.extensions["genapi"]["budgets"]
    budget = budgets.of(Client(name, is_admin=name == "root"))
    key = budgets.key(name, budget, period_bounds(budget.period, time.time())[0])
    return (budgets.redis or budgets.memory).counts(key)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_that_calls_the_model_is_refused_when_the_budget_cannot_cover_it(budget_app, fake_openai, path):
    app = budget_app(token_budget=f"{RESERVED - 1}/day")
    response = PATHS[path](app.test_client())
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert fake_openai.calls == 0
    assert counts(app) == (0, 0)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_settles_to_the_real_usage(budget_app, path):
    app = budget_app()
    response = PATHS[path](app.test_client())
    response.get_data()
    response.close()
    assert response.status_code == 200
    assert counts(app) == (REAL_USAGE, 0)


@pytest.mark.parametrize("path", ["generate", "batch", "v1"])
def test_an_answer_carries_the_budget_left_after_its_real_usage(budget_app, path):
    response = PATHS[path](budget_app().test_client())
    assert response.headers["X-Budget-Limit"] == "1000"
    assert response.headers["X-Budget-Remaining"] == str(1000 - REAL_USAGE)
    assert response.headers["X-Budget-Reset"] == str(period_bounds("day", time.time())[1])


@pytest.mark.parametrize("path", ["generate-stream", "v1-stream"])
def test_a_stream_carries_the_budget_left_after_its_reservation_at_its_start(budget_app, path):
    response = PATHS[path](budget_app().test_client())
    assert response.headers["X-Budget-Remaining"] == str(1000 - RESERVED)
    response.get_data()
    response.close()


def test_budget_exceeded_says_how_much_is_left_and_retries_after_the_reset(budget_app):
    budget = RESERVED + REAL_USAGE - 1  # after one request, one token short of another
    app = budget_app(token_budget=f"{budget}/day")
    client = app.test_client()
    call_generate(client)
    refused = call_generate(client)
    left = budget - REAL_USAGE
    reset_at = period_bounds("day", time.time())[1]
    assert refused.status_code == 429
    assert f"has {left} tokens left" in refused.get_json()["error"]["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= reset_at - int(time.time()) + 1
    assert (refused.headers["X-Budget-Remaining"], refused.headers["X-Budget-Reset"]) == (str(left), str(reset_at))
    assert call_generate(client, max_tokens=left - RESERVED + 50).status_code == 200


def test_a_request_larger_than_the_whole_budget_is_told_no_reset_helps(budget_app):
    response = call_generate(budget_app(token_budget="20/day").test_client())
    assert "no reset lets this request through" in response.get_json()["error"]["message"]


def test_a_batch_reserves_all_its_prompts_at_once(budget_app, fake_openai):
    app = budget_app(token_budget=f"{2 * RESERVED - 1}/day")
    response = call_batch(app.test_client(), prompts=[PROMPT, PROMPT])
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert fake_openai.calls == 0


def test_a_failed_call_releases_its_reservation(budget_app, fake_openai):
    app = budget_app()
    fake_openai.then(Status(500))
    assert call_generate(app.test_client()).status_code == 502
    assert counts(app) == (0, 0)


def test_a_batch_is_charged_only_for_the_prompts_the_model_answered(budget_app):
    app = budget_app()
    response = call_batch(app.test_client(), prompts=[PROMPT, "FAIL:500"])
    assert [result.get("error", {}).get("code") for result in response.get_json()["results"]] == [None, "upstream_error"]
    assert counts(app) == (REAL_USAGE, 0)


def test_a_v1_call_refused_upstream_releases_its_reservation(budget_app, fake_openai):
    app = budget_app()
    fake_openai.then(Status(500))
    assert call_chat(app.test_client()).status_code == 502
    assert counts(app) == (0, 0)


@pytest.mark.parametrize("path", ["generate-stream", "v1-stream"])
def test_a_stream_refused_before_its_first_byte_releases_its_reservation(budget_app, fake_openai, path):
    app = budget_app()
    fake_openai.then(Status(500))
    assert PATHS[path](app.test_client()).status_code == 502
    assert counts(app) == (0, 0)


def test_a_stream_that_fails_before_any_text_releases_its_reservation(budget_app, fake_openai):
    app = budget_app()
    fake_openai.then(Stream(error_at=0))
    response = call_generate_stream(app.test_client())
    assert b"event: error" in response.get_data()
    response.close()
    assert counts(app) == (0, 0)


def test_a_stream_cut_by_the_client_is_charged_its_estimate_once(budget_app, fake_openai):
    app = budget_app()
    fake_openai.then(Stream(hold_at=1))  # the text's first word, "echo:", then the model waits
    response = call_generate_stream(app.test_client())
    pieces = iter(response.response)
    while b"event: delta" not in next(pieces):
        pass
    response.close()  # what the WSGI server does when a write to the client fails
    response.close()
    # The relay's estimate: the prompt's 15 characters and the 5 of "echo:", four to a token, rounded up.
    assert counts(app) == (4 + 2, 0)


def test_a_stream_without_usage_from_the_model_is_charged_its_estimate(budget_app, fake_openai):
    app = budget_app()
    fake_openai.then(Stream(usage=False))
    response = call_generate_stream(app.test_client())
    done = [line for line in response.get_data(as_text=True).split("\n") if line.startswith("data: {\"model\"")]
    response.close()
    assert counts(app) == (json.loads(done[0].removeprefix("data: "))["usage"]["total_tokens"], 0)


def test_cache_hits_cost_nothing_against_the_budget(budget_app, fake_openai):
    app = budget_app(token_budget=f"{RESERVED + REAL_USAGE}/day", cache_ttl=60)
    client = app.test_client()
    assert call_generate(client).status_code == 200
    hit = call_generate(client)  # the budget could not cover a second call to the model
    assert (hit.status_code, hit.headers["X-Cache"], fake_openai.calls) == (200, "HIT", 1)
    assert counts(app) == (REAL_USAGE, 0)
    assert hit.headers["X-Budget-Remaining"] == str(RESERVED)  # where the budget stands: a hit costs nothing


@pytest.mark.parametrize("path", ["generate-stream", "v1"])
def test_a_cache_hit_on_any_path_costs_nothing_and_says_where_the_budget_stands(budget_app, fake_openai, path):
    app = budget_app(cache_ttl=60)
    client = app.test_client()
    PATHS[path](client).get_data()
    hit = PATHS[path](client)
    hit.get_data()
    hit.close()
    assert (hit.headers["X-Cache"], fake_openai.calls) == ("HIT", 1)
    assert hit.headers["X-Budget-Remaining"] == str(1000 - REAL_USAGE)
    assert counts(app) == (REAL_USAGE, 0)


def test_cache_hits_still_count_against_the_rate_limit(budget_app):
    client = budget_app(cache_ttl=60, rate_limit="2/minute").test_client()
    statuses = [call_generate(client).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_shadow_mode_refuses_nothing_and_counts_what_it_would_have_refused(budget_app, caplog):
    app = budget_app(token_budget=f"{RESERVED - 1}/day", token_budget_mode="shadow")
    before = sample("genapi_budget_exceeded_total", mode="shadow")
    with caplog.at_level(logging.WARNING, logger="genapi"):
        assert call_generate(app.test_client()).status_code == 200
    assert sample("genapi_budget_exceeded_total", mode="shadow") == before + 1
    assert any("shadow mode lets it through" in record.getMessage() for record in caplog.records)
    assert counts(app) == (REAL_USAGE, 0)


def test_enforced_refusals_are_counted(budget_app):
    before = sample("genapi_budget_exceeded_total", mode="enforce")
    call_generate(budget_app(token_budget="1/day").test_client())
    assert sample("genapi_budget_exceeded_total", mode="enforce") == before + 1


def test_admins_have_the_token_budget_too_unless_given_their_own(budget_app):
    assert call_generate(budget_app(token_budget="1/day").test_client(), key=ADMIN_KEY).status_code == 429
    admin_budget = budget_app(token_budget="1/day", admin_token_budget="1000/hour")
    response = call_generate(admin_budget.test_client(), key=ADMIN_KEY)
    assert (response.status_code, response.headers["X-Budget-Limit"]) == (200, "1000")
    no_budget = budget_app(token_budget="1/day", admin_token_budget="none").test_client()
    response = call_generate(no_budget, key=ADMIN_KEY)
    assert response.status_code == 200 and "X-Budget-Limit" not in response.headers


def test_a_keys_own_budget_wins_over_the_setting(budget_app):
    app = budget_app(token_budget="1000/day")

    class OwnBudgets:
        def identify(self, presented):
            return Client("carol", budget=Budget(RESERVED - 1, "hour")) if presented == USER_KEY else None

    app.extensions["genapi"]["keys"] = OwnBudgets()
    response = call_generate(app.test_client())
    assert (response.status_code, response.headers["X-Budget-Limit"]) == (429, str(RESERVED - 1))


def test_without_a_budget_no_budget_header_is_sent(budget_app):
    response = call_generate(budget_app(token_budget="").test_client())
    assert response.status_code == 200 and "X-Budget-Limit" not in response.headers


@pytest.mark.parametrize("value", ["1000", "1000/week", "lots/day", "0/day", "-5/day"])
def test_a_token_budget_must_be_tokens_per_calendar_period(value):
    with pytest.raises(ValidationError, match="token budget"):
        make_settings(token_budget=value)


def test_budgets_are_calendar_periods_in_utc():
    new_year_eve = datetime(2026, 12, 31, 23, 59, 30, tzinfo=timezone.utc).timestamp()
    assert period_bounds("month", new_year_eve) == ("2026-12", int(datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()))
    assert period_bounds("day", new_year_eve) == ("2026-12-31", int(new_year_eve) + 30)
    assert period_bounds("hour", new_year_eve)[0] == "2026-12-31T23"
    assert period_bounds("minute", new_year_eve) == ("2026-12-31T23:59", int(new_year_eve) + 30)


def test_a_reservation_whose_process_died_is_charged_in_full_when_it_lapses():
    store = MemoryBudgetStore()
    store.reserve("k", "abandoned:50", 50, 100, lapses_at=time.time() - 1, ttl=3600, force=False)
    outcome, spent, held = store.reserve("k", "next:10", 10, 100, lapses_at=time.time() + 60, ttl=3600, force=False)
    assert (outcome, spent, held) == (1, 50, 10)
    assert store.settle("k", "abandoned:50", 5) == (50, 10)  # too late: it was charged in full, and only once


def test_a_reservation_is_settled_once():
    store = MemoryBudgetStore()
    store.reserve("k", "one:50", 50, 100, lapses_at=time.time() + 60, ttl=3600, force=False)
    assert store.settle("k", "one:50", 20) == (20, 0)
    assert store.settle("k", "one:50", 20) == (20, 0)
