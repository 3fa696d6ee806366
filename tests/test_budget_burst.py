"""A key's token budget under a burst: two instances of two gunicorn workers each, on one Redis and one PostgreSQL,
never overrun it, and the usage ledger ends up charging the key exactly what Redis charged its budget.

Every request reserves 150 tokens and the fake upstream reports 121: the upstream holds each admitted call until
the test releases it, so each round shows exactly which requests the budget could cover while they were in flight.
"""

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx2
import pytest
import redis

from genapi.budget_periods import period_bounds
from genapi.budgets import prompt_tokens_estimate
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.fake_openai import HOLD, Stream, completion_body
from tests.test_scale_out import call, start_instances  # noqa: F401 (a fixture)
from tests.test_streaming_server import events_of

BUDGET = 10_000
RESERVATION = 150
WORDS = 60
BURST_PROMPT = " ".join(["a"] * WORDS)
MAX_TOKENS = RESERVATION - prompt_tokens_estimate(len(BURST_PROMPT))  # so that each request reserves exactly 150
REAL_USAGE = WORDS + WORDS + 1  # the fake counts the prompt's words, then answers "echo:" and the same words
# What a stream cut after its first word is charged: the prompt's characters and "echo:", four to a token.
CUT_STREAM_ESTIMATE = -(-len(BURST_PROMPT) // 4) + -(-len("echo:") // 4)


def budget_counts(redis_settings, name: str = "alice") -> tuple[int, int]:
    """(spent, held) of the key's budget today, as every instance sees it in Redis."""
    period = period_bounds("day", time.time())[0]
    key = f"{redis_settings['redis_key_prefix']}budget:{name}:day:{period}"
    spent, held = redis.Redis.from_url(redis_settings["redis_url"]).hmget(key, "spent", "held")
    return int(spent or 0), int(held or 0)


def start_two_instances(start_instances, redis_settings, database_url, **env):
    env = {"token_budget": f"{BUDGET}/day", "rate_limit": "100000/minute"} | env
    return start_instances(2, **redis_settings, database_url=database_url, **env)


def usage_after_shutdown(instances, reader, key: str, key_id: str) -> tuple[dict, dict]:
    """Stop every instance with SIGTERM, which writes each worker's last ledger rows; then the key's totals in
    GET /admin/usage, which must equal those of its own GET /v1/usage, and the budget that GET /v1/usage shows."""
    for instance in instances:
        assert instance.terminate() == 0, instance.output()
    client = reader.test_client()  # one more instance, on the same database and Redis
    by_admin = client.get(f"/admin/usage?key_id={key_id}&group_by=key", headers={"X-API-KEY": ADMIN_KEY})
    own = client.get("/v1/usage", headers={"X-API-KEY": key})
    assert by_admin.status_code == own.status_code == 200
    assert own.get_json()["totals"] == by_admin.get_json()["totals"]
    return by_admin.get_json()["totals"], own.get_json()["budget"]


@pytest.mark.timeout(300)  # two instances to start on a busy machine, then several rounds
def test_a_burst_never_overruns_the_budget_refuses_only_what_it_cannot_cover_and_the_ledger_agrees(
    start_instances, fake_openai, redis_settings, migrated_postgres_url, make_app
):
    instances = start_two_instances(start_instances, redis_settings, migrated_postgres_url)
    body = {"prompt": BURST_PROMPT, "max_tokens": MAX_TOKENS}
    spent, burst, admitted_in_all, sent = 0, 200, 0, 0
    with ThreadPoolExecutor(max_workers=200) as pool:
        while True:
            coverable = (BUDGET - spent) // RESERVATION
            fake_openai.then(*[HOLD] * coverable)
            futures = [pool.submit(call, instances[n % 2].url, body=body) for n in range(burst)]
            # Every request the budget cannot cover while the others hold their reservations is answered...
            pending = set(futures)
            while len(pending) > coverable:
                done, pending = wait(pending, timeout=120, return_when=FIRST_COMPLETED)
                assert done, f"{len(pending)} requests still unanswered, of which only {coverable} may be admitted"
            # ...and every other one is at the upstream, held there.
            assert fake_openai.wait_for_in_flight(coverable)
            assert fake_openai.in_flight == coverable
            fake_openai.release()
            answers = [future.result() for future in futures]
            fake_openai.hold_again()
            sent += burst
            statuses = [status for status, _, _ in answers]
            assert statuses.count(200) == coverable
            refused = [body for status, _, body in answers if status != 200]
            assert {(body["error"]["code"]) for body in refused} <= {"budget_exceeded"}
            assert len(refused) == burst - coverable
            admitted_in_all += coverable
            spent += coverable * REAL_USAGE
            assert budget_counts(redis_settings) == (spent, 0)
            if coverable == 0:
                break
            burst = coverable + 20
    # What the upstream reported, request by request, is what the budget charged, and never more than the budget.
    reported = sum(completion_body(call["body"], 0)["usage"]["total_tokens"] for call in fake_openai.requests)
    assert reported == spent == admitted_in_all * REAL_USAGE
    assert spent <= BUDGET
    assert BUDGET - spent < RESERVATION  # once settled, the budget covered every request it could
    # One ledger row per request, a refused one with no tokens: the ledger charged alice what Redis charged her budget.
    reader = make_app(database_url=migrated_postgres_url, token_budget=f"{BUDGET}/day", **redis_settings)
    totals, budget = usage_after_shutdown(instances, reader, USER_KEY, "env-alice")
    assert totals["requests"] == sent
    assert totals["total_tokens"] == budget_counts(redis_settings)[0] == spent
    assert (budget["limit"], budget["remaining"]) == (BUDGET, BUDGET - spent)


@pytest.mark.timeout(300)
def test_a_burst_of_streams_some_cut_by_the_client_charges_each_its_own_usage_once_and_the_ledger_agrees(
    start_instances, fake_openai, redis_settings, migrated_postgres_url, make_app
):
    # A database key with its own budget; TOKEN_BUDGET, too small for any of these streams, is not its budget.
    instances = start_two_instances(start_instances, redis_settings, migrated_postgres_url,
                                    token_budget=f"{RESERVATION - 1}/day", stream_heartbeat_seconds=0.2)
    status, _, created = call(instances[0].url, "/admin/keys", {"name": "streams", "token_budget": f"{BUDGET}/day"},
                              key=ADMIN_KEY)
    assert status == 201, created
    coverable = BUDGET // RESERVATION
    burst = coverable + 20
    fake_openai.then(*[Stream(hold_at=1)] * coverable)  # each admitted stream sends "echo:", then waits
    body = {"prompt": BURST_PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    progress = threading.Condition()
    seen = {"started": 0, "refused": 0}
    outcomes: list[str] = []
    cut_now = threading.Event()  # cuts wait until the whole burst is answered or held, so none frees budget early

    def stream(position: int) -> None:
        with httpx2.Client(timeout=120) as client:
            url = f"{instances[position % 2].url}/generate"
            with client.stream("POST", url, json=body, headers={"X-API-KEY": created["key"]}) as response:
                if response.status_code != 200:
                    response.read()
                    with progress:
                        seen["refused"] += 1
                        progress.notify_all()
                    outcomes.append(response.json()["error"]["code"])
                    return
                assert int(response.headers["X-Budget-Remaining"]) >= 0
                lines = response.iter_lines()
                events = events_of(lines)
                while next(events)[0] != "delta":
                    pass
                with progress:
                    started = seen["started"]
                    seen["started"] += 1
                    progress.notify_all()
                if started % 3 == 0:
                    cut_now.wait(120)
                    outcomes.append("cut")
                    return  # leaving the block closes the connection mid-stream
                ending = [event for event, _ in events if event in ("done", "error")]
                outcomes.append(ending[-1] if ending else "no ending")

    with ThreadPoolExecutor(max_workers=burst) as pool:
        futures = [pool.submit(stream, n) for n in range(burst)]
        with progress:
            assert progress.wait_for(lambda: seen["started"] == coverable and seen["refused"] == burst - coverable,
                                     timeout=120), seen
        cut_now.set()
        cut = len(range(0, coverable, 3))
        assert fake_openai.wait_for_abandoned_streams(cut, timeout=60)
        fake_openai.release()
        for future in futures:
            future.result()
    fake_openai.hold_again()
    assert sorted(set(outcomes)) == ["budget_exceeded", "cut", "done"]
    completed, refused = outcomes.count("done"), outcomes.count("budget_exceeded")
    assert (completed + cut, refused) == (coverable, burst - coverable)
    # Each stream settles in its worker as it ends; the last may still be settling when its client has read done.
    deadline = time.monotonic() + 30
    while budget_counts(redis_settings, "streams")[1] and time.monotonic() < deadline:
        time.sleep(0.05)  # settling happens in other processes: there is nothing here to wait on but Redis
    spent = completed * REAL_USAGE + cut * CUT_STREAM_ESTIMATE
    assert budget_counts(redis_settings, "streams") == (spent, 0)
    # Each stream's ledger row is written at its end with what it was charged, a cut one with its estimate.
    reader = make_app(database_url=migrated_postgres_url, **redis_settings)
    totals, budget = usage_after_shutdown(instances, reader, created["key"], created["id"])
    assert totals["requests"] == burst
    assert totals["total_tokens"] == budget_counts(redis_settings, "streams")[0] == spent
    assert (budget["limit"], budget["remaining"]) == (BUDGET, BUDGET - spent)
