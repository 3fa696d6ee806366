"""The usage ledger: one row per request that reached the model or the cache, written off the request path, kept
while the database is away, and read back as totals by /v1/usage and /admin/usage."""

import csv
import io
import logging

import httpx2
from sqlalchemy import func, select, text

from genapi.database import Database, database_url, upgrade
from genapi.models import usage_ledger
from genapi.usage import Ledger
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.procfile import free_port

ADMIN = {"X-API-KEY": ADMIN_KEY}
USER = {"X-API-KEY": USER_KEY}


def rows(app) -> list[dict]:
    app.extensions["genapi"]["ledger"].flush()
    with app.extensions["genapi"]["database"].engine.connect() as connection:
        return [dict(row) for row in connection.execute(text("SELECT * FROM usage ORDER BY id")).mappings()]


def test_each_answered_request_writes_one_row_with_its_tokens_and_never_its_prompt_or_output(db_app):
    app = db_app()
    response = app.test_client().post("/generate", json={"prompt": "A secret prompt."}, headers=USER | {"X-Request-ID": "req-1"})
    body = response.get_json()
    [row] = rows(app)
    assert {
        "request_id": "req-1", "key_name": "alice", "key_id": None, "route": "/generate", "model": "test-model",
        "prompt_tokens": body["usage"]["prompt_tokens"], "completion_tokens": body["usage"]["completion_tokens"],
        "estimated": False, "cached": False, "status": 200, "error_code": None,
    }.items() <= row.items()
    assert row["duration_ms"] > 0 and row["upstream_ms"] is not None
    assert "A secret prompt." not in repr(row) and body["response"] not in repr(row)


def test_a_row_names_the_model_that_answered(db_app):
    app = db_app(llm_provider="mock")  # asked for the default model, answered by the mock
    assert app.test_client().post("/generate", json={"prompt": "Hi."}, headers=USER).get_json()["model"] == "mock"
    [row] = rows(app)
    assert row["model"] == "mock"


def test_a_request_refused_before_the_model_writes_no_row(db_app):
    app = db_app()
    client = app.test_client()
    client.post("/generate", json={"prompt": ""}, headers=USER)
    client.post("/generate", json={"prompt": "Hi."})
    client.get("/healthz")
    assert rows(app) == []


def test_a_failed_upstream_call_writes_a_row_with_its_error_code(db_app, upstream):
    app = db_app()
    upstream.then(httpx2.Response(500, json={"error": {"message": "boom"}}))
    assert app.test_client().post("/generate", json={"prompt": "Hi."}, headers=USER).status_code == 502
    [row] = rows(app)
    assert (row["status"], row["error_code"], row["prompt_tokens"]) == (502, "upstream_error", 0)


def test_a_cached_answer_writes_a_row_marked_cached_with_no_tokens_spent(db_app):
    app = db_app(cache_ttl=60)
    client = app.test_client()
    for _ in range(2):
        client.post("/generate", json={"prompt": "Hi."}, headers=USER)
    first, second = rows(app)
    assert (first["cached"], second["cached"]) == (False, True)
    assert (second["prompt_tokens"], second["completion_tokens"], second["upstream_ms"]) == (0, 0, None)


def test_a_batch_writes_one_row_with_the_tokens_of_all_its_prompts(db_app):
    app = db_app()
    results = app.test_client().post("/generate/batch", json={"prompts": ["a b", "c d e"]}, headers=USER).get_json()["results"]
    [row] = rows(app)
    assert row["route"] == "/generate/batch"
    assert row["prompt_tokens"] == sum(result["usage"]["prompt_tokens"] for result in results)
    assert row["completion_tokens"] == sum(result["usage"]["completion_tokens"] for result in results)


def test_a_database_keys_rows_carry_its_id(db_app):
    app = db_app()
    client = app.test_client()
    created = client.post("/admin/keys", json={"name": "team-b"}, headers=ADMIN).get_json()
    client.post("/generate", json={"prompt": "Hi."}, headers={"X-API-KEY": created["key"]})
    [row] = rows(app)
    assert (row["key_name"], row["key_id"]) == ("team-b", created["id"])


def test_v1_usage_is_the_callers_own_totals_and_admin_usage_adds_up_to_the_same(db_app):
    app = db_app()
    client = app.test_client()
    other = client.post("/admin/keys", json={"name": "team-c"}, headers=ADMIN).get_json()
    for model in ("test-model", "test-model", "other-model"):
        client.post("/generate", json={"prompt": "Tell me a joke.", "model": model}, headers=USER)
    client.post("/generate", json={"prompt": "Hi."}, headers={"X-API-KEY": other["key"]})
    app.extensions["genapi"]["ledger"].flush()
    own = client.get("/v1/usage", headers=USER).get_json()
    assert (own["key_name"], own["key_id"]) == ("alice", None)
    assert sorted((line["model"], line["requests"]) for line in own["data"]) == [("other-model", 1), ("test-model", 2)]
    assert own["totals"]["requests"] == 3
    report = client.get("/admin/usage?group_by=key", headers=ADMIN).get_json()
    by_key = {line["key_name"]: line for line in report["data"]}
    assert by_key["alice"]["total_tokens"] == own["totals"]["total_tokens"]
    assert by_key["team-c"]["requests"] == 1
    assert report["totals"]["requests"] == 4
    assert client.get("/admin/usage?key_id=env-alice", headers=ADMIN).get_json()["totals"] == own["totals"]
    detail = client.get(f"/admin/keys/{other['id']}", headers=ADMIN).get_json()
    assert detail["usage"]["totals"]["requests"] == 1


def test_admin_usage_comes_as_csv_when_asked(db_app):
    app = db_app()
    client = app.test_client()
    client.post("/generate", json={"prompt": "Hi."}, headers=USER)
    app.extensions["genapi"]["ledger"].flush()
    response = client.get("/admin/usage?group_by=key,model", headers=ADMIN | {"Accept": "text/csv"})
    assert response.content_type.startswith("text/csv")
    [line] = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert (line["key_name"], line["model"], line["requests"]) == ("alice", "test-model", "1")


def test_a_wrong_date_range_or_grouping_is_a_422(client):
    for path, headers in (
        ("/v1/usage?start=yesterday", USER),
        ("/v1/usage?start=", USER),
        ("/admin/usage?group_by=colour", ADMIN),
        ("/admin/usage?group_by=", ADMIN),
    ):
        response = client.get(path, headers=headers)
        assert (response.status_code, response.get_json()["error"]["code"]) == (422, "validation_error"), path


def test_a_start_after_the_end_is_an_empty_range(client):
    report = client.get("/v1/usage?start=2026-02-01&end=2026-01-01", headers=USER).get_json()
    assert (report["data"], report["totals"]["requests"]) == ([], 0)


def test_a_range_at_the_ends_of_the_calendar_is_answered(client):
    for query in ("start=9999-12-30", "end=0001-01-02", "start=0001-01-01&end=9999-12-31"):
        assert client.get(f"/v1/usage?{query}", headers=USER).status_code == 200, query


def test_v1_usage_needs_a_key(client):
    assert client.get("/v1/usage").status_code == 401


def unreachable_database() -> Database:
    return Database(database_url(make_settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none")))


def row(n: int) -> dict:
    return {"request_id": f"r{n}", "key_name": "alice", "key_id": None, "route": "/generate", "model": "m",
            "prompt_tokens": 1, "completion_tokens": 2, "status": 200, "duration_ms": 1.0}


def test_past_the_bound_the_oldest_rows_are_dropped_logged_and_counted(caplog):
    from genapi import metrics

    ledger = Ledger(unreachable_database(), flush_seconds=60, buffer_rows=3)
    ledger._closing = True  # no writer: this test flushes by hand
    dropped_before = metrics.USAGE_DROPPED._value.get()
    for n in range(5):
        ledger.record(**row(n))
    assert [waiting["request_id"] for waiting in ledger._rows] == ["r2", "r3", "r4"]
    assert metrics.USAGE_DROPPED._value.get() - dropped_before == 2
    with caplog.at_level(logging.WARNING, logger="genapi"):
        assert ledger.flush() is False
    assert "2 rows dropped" in caplog.text
    assert ledger.waiting == 3


def test_rows_wait_while_the_database_is_away_and_arrive_once_it_is_back(private_postgres):
    url = database_url(make_settings(database_url=private_postgres.url))
    upgrade(url)
    ledger = Ledger(Database(url), flush_seconds=60, buffer_rows=100)
    ledger._closing = True
    private_postgres.stop()
    for n in range(3):
        ledger.record(**row(n))
    assert ledger.flush() is False and ledger.waiting == 3
    private_postgres.start()
    assert ledger.flush() is True and ledger.waiting == 0
    with ledger._database.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(usage_ledger)).scalar() == 3


def test_rows_the_database_refuses_wait_and_arrive_once_it_takes_them(migrated_postgres_url):
    database = Database(database_url(make_settings(database_url=migrated_postgres_url)))
    ledger = Ledger(database, flush_seconds=60, buffer_rows=100)
    ledger._closing = True
    with database.engine.begin() as connection:  # the write fails inside PostgreSQL's COPY, past SQLAlchemy
        connection.execute(text("ALTER TABLE usage RENAME TO usage_elsewhere"))
    for n in range(3):
        ledger.record(**row(n))
    assert ledger.flush() is False and ledger.waiting == 3
    with database.engine.begin() as connection:
        connection.execute(text("ALTER TABLE usage_elsewhere RENAME TO usage"))
    assert ledger.flush() is True and ledger.waiting == 0
    with database.engine.connect() as connection:
        assert connection.execute(select(usage_ledger.c.request_id).order_by(usage_ledger.c.id)).scalars().all() == ["r0", "r1", "r2"]
