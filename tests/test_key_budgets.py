"""A database key's own token budget: over TOKEN_BUDGET and ADMIN_TOKEN_BUDGET, set and changed at run time, and
where it stands in GET /v1/usage."""

import json
import logging
import time

import pytest
from sqlalchemy import text

from genapi.budget_periods import period_bounds
from genapi.budgets import prompt_tokens_estimate
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.test_database_keys import ADMIN, code, create, generate

PROMPT = "Tell me a joke."  # the mock upstream echoes it: 4 prompt words and 5 answered, 9 tokens in all
REAL_USAGE = 9
RESERVED = prompt_tokens_estimate(len(PROMPT)) + 50  # each call below asks for max_tokens 50
# Covers one reservation, not a second once the first has settled to its real usage.
ONE_REQUEST = f"{RESERVED + 2}/day"


def call(client, key):
    return generate(client, key, max_tokens=50)


def test_a_key_with_its_own_budget_is_refused_past_it_while_a_key_on_token_budget_is_not(db_app):
    client = db_app(token_budget="1000/day").test_client()
    own = create(client, name="own-budget", token_budget=ONE_REQUEST)
    assert own["token_budget"] == ONE_REQUEST
    shared = create(client, name="global-budget")
    assert shared["token_budget"] is None
    assert call(client, own["key"]).status_code == 200
    refused = call(client, own["key"])
    assert (refused.status_code, code(refused)) == (429, "budget_exceeded")
    assert refused.headers["X-Budget-Limit"] == str(RESERVED + 2)
    for _ in range(2):
        answered = call(client, shared["key"])
        assert (answered.status_code, answered.headers["X-Budget-Limit"]) == (200, "1000")


def test_a_keys_own_budget_of_none_is_no_budget_whatever_token_budget_says(db_app):
    client = db_app(token_budget=ONE_REQUEST).test_client()
    unlimited = create(client, token_budget="none")
    for _ in range(3):
        answered = call(client, unlimited["key"])
        assert answered.status_code == 200
        assert "X-Budget-Limit" not in answered.headers
    assert client.get(f"/admin/keys/{unlimited['id']}", headers=ADMIN).get_json()["token_budget"] == "none"


def test_an_admin_keys_own_budget_overrides_admin_token_budget(db_app):
    client = db_app(admin_token_budget="none").test_client()
    admin = create(client, role="admin", token_budget=ONE_REQUEST)
    assert call(client, admin["key"]).status_code == 200
    assert code(call(client, admin["key"])) == "budget_exceeded"
    assert call(client, ADMIN_KEY).status_code == call(client, ADMIN_KEY).status_code == 200


def test_a_changed_budget_counts_at_once_where_it_was_changed_and_elsewhere_within_key_cache_seconds(db_app):
    first, second = db_app(), db_app()
    now = [0.0]
    second.extensions["genapi"]["keys"].database_keys._clock = lambda: now[0]
    created = create(first.test_client(), token_budget="1000/day")
    assert call(second.test_client(), created["key"]).headers["X-Budget-Limit"] == "1000"  # cached there now
    changed = first.test_client().patch(f"/admin/keys/{created['id']}", json={"token_budget": "10/day"}, headers=ADMIN)
    assert changed.get_json()["token_budget"] == "10/day"
    assert code(call(first.test_client(), created["key"])) == "budget_exceeded"
    now[0] += 0.9
    assert call(second.test_client(), created["key"]).headers["X-Budget-Limit"] == "1000"
    now[0] += 0.1  # KEY_CACHE_SECONDS (1.0) after the read: read again
    refused = call(second.test_client(), created["key"])
    assert (code(refused), refused.headers["X-Budget-Limit"]) == ("budget_exceeded", "10")


def test_a_budget_cleared_with_null_goes_back_to_token_budget(db_app):
    client = db_app(token_budget="1000/day").test_client()
    created = create(client, token_budget="none")
    cleared = client.patch(f"/admin/keys/{created['id']}", json={"token_budget": None}, headers=ADMIN)
    assert cleared.get_json()["token_budget"] is None
    assert call(client, created["key"]).headers["X-Budget-Limit"] == "1000"


def test_a_budget_is_kept_as_it_reads_back_whatever_its_plural(db_app):
    client = db_app().test_client()
    assert create(client, token_budget="500/hours")["token_budget"] == "500/hour"


@pytest.mark.parametrize("value", ["lots", "0/day", "100/week", "100 per day", "None", 100],
                         ids=["words", "zero", "week", "per", "None", "a number"])
def test_a_wrong_token_budget_is_a_422_on_create_and_on_change(db_app, value):
    client = db_app().test_client()
    created = create(client)
    for response in (
        client.post("/admin/keys", json={"name": "wrong", "token_budget": value}, headers=ADMIN),
        client.patch(f"/admin/keys/{created['id']}", json={"token_budget": value}, headers=ADMIN),
    ):
        assert (response.status_code, code(response)) == (422, "validation_error")
        assert response.get_json()["error"]["param"] == "token_budget"
    assert client.get(f"/admin/keys/{created['id']}", headers=ADMIN).get_json()["token_budget"] is None


def test_a_budget_change_is_in_the_audit_log_before_and_after(db_app):
    client = db_app().test_client()
    created = create(client, token_budget="1000/day")
    client.patch(f"/admin/keys/{created['id']}", json={"token_budget": "none"}, headers=ADMIN)
    entries = client.get(f"/admin/audit?key_id={created['id']}", headers=ADMIN).get_json()["data"]
    assert [entry["action"] for entry in entries] == ["key.updated", "key.created"]
    assert (entries[0]["before"]["token_budget"], entries[0]["after"]["token_budget"]) == ("1000/day", "none")
    assert entries[1]["after"]["token_budget"] == "1000/day"
    assert created["key"].split("_", 2)[2] not in json.dumps(entries)


def test_the_command_line_sets_changes_and_clears_a_keys_budget(db_app):
    app = db_app()
    runner = app.test_cli_runner()

    def invoke(*args):
        result = runner.invoke(args=list(args))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    created = invoke("keys", "create", "cli-budget", "--token-budget", "5000/day")
    assert created["token_budget"] == "5000/day"
    assert invoke("keys", "update", created["id"], "--token-budget", "none")["token_budget"] == "none"
    assert invoke("keys", "update", created["id"], "--token-budget", "")["token_budget"] is None
    wrong = runner.invoke(args=["keys", "create", "cli-wrong", "--token-budget", "lots"])
    assert wrong.exit_code == 2 and "token_budget" in wrong.output


def test_v1_usage_shows_where_the_keys_budget_stands(db_app):
    app = db_app(token_budget="1000/day")
    client = app.test_client()
    assert call(client, USER_KEY).status_code == 200
    budget = client.get("/v1/usage", headers={"X-API-KEY": USER_KEY}).get_json()["budget"]
    assert budget == {"limit": 1000, "period": "day", "remaining": 1000 - REAL_USAGE,
                      "reset": period_bounds("day", time.time())[1]}


def test_v1_usage_shows_a_keys_own_budget_and_null_for_a_key_without_one(db_app):
    client = db_app().test_client()
    own = create(client, name="own", token_budget="300/hour")
    unlimited = create(client, name="unlimited")
    budget = client.get("/v1/usage", headers={"X-API-KEY": own["key"]}).get_json()["budget"]
    assert (budget["limit"], budget["period"], budget["remaining"]) == (300, "hour", 300)
    assert client.get("/v1/usage", headers={"X-API-KEY": unlimited["key"]}).get_json()["budget"] is None


def test_a_budget_in_the_database_that_is_not_one_counts_as_unset_and_is_logged(db_app, caplog):
    app = db_app(token_budget="1000/day")
    client = app.test_client()
    created = create(client, token_budget="none")
    with app.extensions["genapi"]["database"].engine.begin() as connection:  # as a hand-made edit would leave it
        connection.execute(text("UPDATE api_keys SET token_budget = 'lots' WHERE id = :id"), {"id": created["id"]})
    app.extensions["genapi"]["keys"].database_keys.forget(created["id"])
    with caplog.at_level(logging.WARNING, logger="genapi"):
        answered = call(client, created["key"])
    assert (answered.status_code, answered.headers["X-Budget-Limit"]) == (200, "1000")
    assert any("token_budget that is not one" in record.getMessage() for record in caplog.records)
