"""`flask keys ...`: the admin API's operations from the command line, against the same database."""

import json

from tests.conftest import ADMIN_KEY

ADMIN = {"X-API-KEY": ADMIN_KEY}


def invoke(app, *args):
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_key_created_on_the_command_line_works_through_the_api(db_app):
    app = db_app()
    created = invoke(app, "keys", "create", "cli-team", "--rate-limit", "5/minute", "--allowed-models", "test-model")
    assert (created["rate_limit"], created["allowed_models"]) == ("5/minute", ["test-model"])
    client = app.test_client()
    response = client.post("/generate", json={"prompt": "Hi."}, headers={"X-API-KEY": created["key"]})
    assert response.status_code == 200
    assert client.get(f"/admin/keys/{created['id']}", headers=ADMIN).get_json()["name"] == "cli-team"


def test_the_command_line_lists_updates_rotates_and_revokes_and_the_audit_log_says_cli(db_app):
    app = db_app()
    created = invoke(app, "keys", "create", "ops", "--admin", "--expires-at", "2999-01-31T00:00:00Z")
    assert created["expires_at"] == "2999-01-31T00:00:00+00:00"
    assert created["role"] == "admin"
    assert created["id"] in [key["id"] for key in invoke(app, "keys", "list")]
    assert invoke(app, "keys", "update", created["id"], "--rate-limit", "9/minute")["rate_limit"] == "9/minute"
    assert invoke(app, "keys", "update", created["id"], "--rate-limit", "")["rate_limit"] is None
    rotated = invoke(app, "keys", "rotate", created["id"], "--grace-seconds", "60")
    assert rotated["key"] != created["key"]
    assert invoke(app, "keys", "revoke", created["id"])["status"] == "revoked"
    assert invoke(app, "keys", "show", created["id"])["status"] == "revoked"
    audit = invoke(app, "keys", "audit", "--key-id", created["id"])
    assert [entry["action"] for entry in audit] == ["key.revoked", "key.rotated", "key.updated", "key.updated", "key.created"]
    assert {entry["actor"] for entry in audit} == {"cli"}


def test_a_wrong_option_or_an_unknown_id_fails_with_a_message(db_app):
    app = db_app()
    runner = app.test_cli_runner()
    wrong = runner.invoke(args=["keys", "create", "team", "--rate-limit", "lots"])
    assert wrong.exit_code == 2 and "rate_limit" in wrong.output
    unknown = runner.invoke(args=["keys", "revoke", "000000000000"])
    assert unknown.exit_code == 1 and "no key has the id" in unknown.output
    environment = runner.invoke(args=["keys", "revoke", "env-alice"])
    assert environment.exit_code == 1 and "API_KEYS" in environment.output
    revoked = invoke(app, "keys", "create", "gone")["id"]
    runner.invoke(args=["keys", "revoke", revoked])
    rotated = runner.invoke(args=["keys", "rotate", revoked])
    assert rotated.exit_code == 1 and "is revoked" in rotated.output
    audit = runner.invoke(args=["keys", "audit", "--key-id", "000000000000"])
    assert audit.exit_code == 1 and "no key has the id" in audit.output
