"""The ledger on the Procfile's service: nothing lost on SIGTERM, nothing failed while PostgreSQL is away."""

import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ADMIN_KEY, admin_connection
from tests.test_database import create_key_through_api


def post_generate(url: str, key: str) -> tuple[int, dict]:
    body = json.dumps({"prompt": "Tell me a joke.", "max_tokens": 20}).encode()
    headers = {"Content-Type": "application/json", "X-API-KEY": key}
    request = urllib.request.Request(f"{url}/generate", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
    except OSError:
        return 0, {}  # refused: the service had stopped listening


def ledger_rows(database_url: str) -> list[tuple]:
    with admin_connection(database_url) as connection:
        return connection.execute("SELECT request_id, prompt_tokens, completion_tokens, status FROM usage").fetchall()


def test_sigterm_under_load_leaves_exactly_one_row_per_answered_request(
    start_fake_openai, start_procfile_service, migrated_postgres_url
):
    upstream = start_fake_openai(delay=2)
    service = start_procfile_service(
        upstream.base_url, DATABASE_URL=migrated_postgres_url, ADMIN_API_KEYS=f"root:{ADMIN_KEY}",
        RATE_LIMIT="10000/minute", USAGE_FLUSH_SECONDS="10",  # longer than the test: only the shutdown flush writes
    )
    key = create_key_through_api(service.url, "load")
    with ThreadPoolExecutor(40) as pool:
        answers = [pool.submit(post_generate, service.url, key) for _ in range(40)]
        assert upstream.wait_for_in_flight(40), "the 40 requests were never all in flight"
        service.process.send_signal(signal.SIGTERM)
        results = [answer.result() for answer in answers]
    assert service.process.wait(30) == 0
    answered = {body["id"]: body["usage"] for status, body in results if status == 200}
    assert len(answered) == 40
    rows = ledger_rows(migrated_postgres_url)
    assert sorted(row[0] for row in rows) == sorted(answered)
    for request_id, prompt_tokens, completion_tokens, status in rows:
        usage = answered[request_id]
        assert (prompt_tokens, completion_tokens, status) == (usage["prompt_tokens"], usage["completion_tokens"], 200)


def test_stopping_postgres_under_load_fails_no_request_and_its_rows_arrive_once_it_is_back(
    start_fake_openai, start_procfile_service, private_postgres
):
    from genapi.database import database_url, upgrade
    from tests.conftest import make_settings

    upgrade(database_url(make_settings(database_url=private_postgres.url)))
    upstream = start_fake_openai(delay=0.05)
    service = start_procfile_service(
        upstream.base_url, DATABASE_URL=private_postgres.url, ADMIN_API_KEYS=f"root:{ADMIN_KEY}",
        RATE_LIMIT="100000/minute", USAGE_FLUSH_SECONDS="0.2",
    )
    key = create_key_through_api(service.url, "steady")

    def load(rounds: int) -> list[tuple[int, dict]]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: post_generate(service.url, key), range(rounds)))

    results = load(40)  # the key is now known to every worker
    private_postgres.stop()
    results += load(80)  # with the database away: keys from the cache, rows in the buffer
    private_postgres.start()
    results += load(40)
    assert [status for status, _ in results] == [200] * len(results)
    answered = {body["id"] for _, body in results}
    deadline = time.monotonic() + 20
    while len(rows := ledger_rows(private_postgres.url)) < len(answered) and time.monotonic() < deadline:
        time.sleep(0.2)  # the writer retries on its own schedule; this polls the table it fills
    assert sorted(row[0] for row in rows) == sorted(answered)
    assert "reachable again" in service.output()
