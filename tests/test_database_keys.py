"""Keys in the database: made, used, limited, rotated and revoked at run time, across instances sharing one database."""

import hashlib
import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from tests.conftest import ADMIN_KEY, USER_KEY

ADMIN = {"X-API-KEY": ADMIN_KEY}


def create(client, **body):
    response = client.post("/admin/keys", json={"name": "team-a"} | body, headers=ADMIN)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def generate(client, key, **body):
    return client.post("/generate", json={"prompt": "Tell me a joke."} | body, headers={"X-API-KEY": key})


def code(response):
    return response.get_json()["error"]["code"]


def test_a_created_key_works_at_once(db_app):
    client = db_app().test_client()
    key = create(client)["key"]
    assert key.startswith("gk_")
    assert generate(client, key).status_code == 200


def test_only_a_digest_of_the_secret_is_stored(db_app):
    app = db_app()
    created = create(app.test_client())
    secret = created["key"].split("_", 2)[2]
    with app.extensions["genapi"]["database"].engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert bytes(rows[0]["secret_digest"]) == hashlib.sha256(secret.encode()).digest()
    assert secret not in repr([dict(row) for row in rows])


def test_a_right_id_with_a_wrong_secret_is_not_accepted(db_app):
    client = db_app().test_client()
    created = create(client)
    wrong = f"gk_{created['id']}_{'x' * 43}"
    assert code(generate(client, wrong)) == "invalid_api_key"


def test_a_revoked_key_is_refused_with_its_own_code(db_app):
    client = db_app().test_client()
    created = create(client)
    assert client.delete(f"/admin/keys/{created['id']}", headers=ADMIN).get_json()["status"] == "revoked"
    response = generate(client, created["key"])
    assert (response.status_code, code(response)) == (403, "key_revoked")


def test_an_expired_key_is_refused_with_its_own_code(db_app):
    client = db_app().test_client()
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    created = create(client, expires_at=past)
    assert created["status"] == "expired"
    response = generate(client, created["key"])
    assert (response.status_code, code(response)) == (403, "key_expired")


def test_a_keys_own_rate_limit_overrides_rate_limit(db_app):
    client = db_app(rate_limit="100/minute").test_client()
    key = create(client, rate_limit="1/minute")["key"]
    assert generate(client, key).status_code == 200
    response = generate(client, key)
    assert (response.status_code, code(response)) == (429, "rate_limit_exceeded")
    assert response.headers["X-RateLimit-Limit"] == "1"


def test_a_keys_own_models_override_allowed_models(db_app):
    client = db_app(allowed_models="test-model").test_client()
    key = create(client, allowed_models=["other-model"])["key"]
    assert generate(client, key, model="other-model").status_code == 200
    assert code(generate(client, key, model="test-model")) == "model_not_allowed"


def chat(client, key, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_a_keys_own_models_override_allowed_models_on_v1_too(db_app):
    client = db_app(allowed_models="test-model").test_client()
    key = create(client, allowed_models=["other-model"])["key"]
    assert chat(client, key, "other-model").status_code == 200
    refused = chat(client, key, "test-model")
    assert refused.status_code == 404 and code(refused) == "model_not_found"


def test_v1_models_lists_a_keys_own_models(db_app):
    client = db_app(allowed_models="test-model").test_client()
    key = create(client, allowed_models=["other-model", "third-model"])["key"]
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).get_json()["data"]
    assert [model["id"] for model in listed] == ["other-model", "third-model"]


def test_a_changed_limit_applies_at_once_on_the_instance_that_changed_it(db_app):
    client = db_app(rate_limit="100/minute").test_client()
    created = create(client)
    assert generate(client, created["key"]).status_code == 200
    client.patch(f"/admin/keys/{created['id']}", json={"rate_limit": "1/minute"}, headers=ADMIN)
    # A new limit counts from its own start (limits keeps one window per limit).
    assert generate(client, created["key"]).headers["X-RateLimit-Limit"] == "1"
    assert generate(client, created["key"]).status_code == 429


def test_a_key_made_on_one_instance_works_on_another_at_once_and_a_revoked_one_is_refused_within_two_seconds(db_app):
    first, second = db_app().test_client(), db_app(rate_limit="100000/minute").test_client()
    created = create(first)
    assert generate(second, created["key"]).status_code == 200  # now cached by the second instance
    revoked_at = datetime.now(timezone.utc)
    first.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    while (response := generate(second, created["key"])).status_code == 200:
        assert datetime.now(timezone.utc) - revoked_at < timedelta(seconds=2)
    assert code(response) == "key_revoked"


def test_another_instance_trusts_a_cached_key_only_for_key_cache_seconds(db_app):
    first, second = db_app(), db_app()
    now = [0.0]
    second.extensions["genapi"]["keys"].database_keys._clock = lambda: now[0]
    created = create(first.test_client())
    assert generate(second.test_client(), created["key"]).status_code == 200
    first.test_client().delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    now[0] += 0.9
    assert generate(second.test_client(), created["key"]).status_code == 200
    now[0] += 0.1  # KEY_CACHE_SECONDS (1.0) after the read: read again
    assert code(generate(second.test_client(), created["key"])) == "key_revoked"


def test_rotation_stops_the_old_secret_at_once(db_app):
    client = db_app().test_client()
    created = create(client)
    rotated = client.post(f"/admin/keys/{created['id']}/rotate", headers=ADMIN).get_json()
    assert rotated["id"] == created["id"] and rotated["key"] != created["key"]
    assert generate(client, rotated["key"]).status_code == 200
    assert code(generate(client, created["key"])) == "invalid_api_key"


def test_rotation_with_a_grace_period_keeps_the_old_secret_until_it_ends(db_app):
    app = db_app()
    client = app.test_client()
    created = create(client)
    rotated = client.post(f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 3600}, headers=ADMIN).get_json()
    assert generate(client, created["key"]).status_code == 200
    assert generate(client, rotated["key"]).status_code == 200
    with app.extensions["genapi"]["database"].engine.begin() as connection:  # the hour has passed
        connection.execute(text("UPDATE api_keys SET previous_valid_until = :past"), {"past": datetime(2000, 1, 1)})
    app.extensions["genapi"]["keys"].database_keys.forget(created["id"])
    assert code(generate(client, created["key"])) == "invalid_api_key"
    assert generate(client, rotated["key"]).status_code == 200


def test_an_admin_key_from_the_database_reaches_the_admin_api(db_app):
    client = db_app().test_client()
    admin_key = create(client, name="ops", role="admin")["key"]
    assert client.get("/admin/keys", headers={"X-API-KEY": admin_key}).status_code == 200


def test_the_admin_api_is_for_admin_keys_only(db_app):
    client = db_app().test_client()
    user_key = create(client)["key"]
    for key in (USER_KEY, user_key):
        response = client.get("/admin/keys", headers={"X-API-KEY": key})
        assert (response.status_code, code(response)) == (403, "admin_only")
    assert code(client.get("/admin/keys")) == "missing_api_key"


def test_keys_from_the_environment_are_listed_and_cannot_be_changed_through_the_api(db_app):
    client = db_app().test_client()
    listed = client.get("/admin/keys", headers=ADMIN).get_json()["data"]
    assert {"id": "env-alice", "source": "environment", "role": "user"}.items() <= listed[0].items()
    for response in (
        client.delete("/admin/keys/env-alice", headers=ADMIN),
        client.patch("/admin/keys/env-alice", json={"rate_limit": "1/minute"}, headers=ADMIN),
        client.post("/admin/keys/env-alice/rotate", headers=ADMIN),
    ):
        assert (response.status_code, code(response)) == (409, "key_from_environment")
        assert "API_KEYS" in response.get_json()["error"]["message"]
    assert generate(client, USER_KEY).status_code == 200


def test_an_unknown_key_id_is_a_404(db_app):
    client = db_app().test_client()
    for response in (
        client.get("/admin/keys/000000000000", headers=ADMIN),
        client.delete("/admin/keys/000000000000", headers=ADMIN),
        client.get("/admin/keys/env-nobody", headers=ADMIN),
    ):
        assert (response.status_code, code(response)) == (404, "key_not_found")


@pytest.mark.parametrize(
    "body, param",
    [({"name": "has space"}, "name"), ({"name": "a", "role": "root"}, "role"), ({"name": "a", "rate_limit": "lots"}, "rate_limit"),
     ({"name": "a", "colour": "red"}, "colour"), ({"name": "a", "expires_at": "soon"}, "expires_at")],
    ids=["name", "role", "rate limit", "unknown field", "expires_at"],
)
def test_a_wrong_key_body_is_a_422_naming_the_field(client, body, param):
    response = client.post("/admin/keys", json=body, headers=ADMIN)
    assert (response.status_code, code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["param"] == param


def test_a_key_body_that_is_not_json_is_a_415(client):
    response = client.post("/admin/keys", data="name=a", headers=ADMIN)
    assert (response.status_code, code(response)) == (415, "unsupported_media_type")


def test_every_admin_action_is_in_the_audit_log_with_who_and_the_key_before_and_after(db_app):
    client = db_app().test_client()
    created = create(client)
    client.patch(f"/admin/keys/{created['id']}", json={"rate_limit": "5/minute"}, headers=ADMIN)
    client.post(f"/admin/keys/{created['id']}/rotate", headers=ADMIN)
    client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    entries = client.get("/admin/audit", headers=ADMIN).get_json()["data"]
    assert [entry["action"] for entry in entries] == ["key.revoked", "key.rotated", "key.updated", "key.created"]
    assert {entry["actor"] for entry in entries} == {"root"}
    updated = entries[2]
    assert (updated["before"]["rate_limit"], updated["after"]["rate_limit"]) == (None, "5/minute")
    assert entries[3]["before"] is None and entries[0]["after"]["status"] == "revoked"
    assert client.get(f"/admin/audit?key_id={created['id']}&limit=1", headers=ADMIN).get_json()["data"] == entries[:1]


def test_a_revoked_key_cannot_be_rotated_or_changed_and_nothing_is_recorded(db_app):
    client = db_app().test_client()
    created = create(client)
    client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    rotated = client.post(f"/admin/keys/{created['id']}/rotate", headers=ADMIN)
    assert rotated.status_code == 409 and code(rotated) == "key_revoked" and "key" not in rotated.get_json()
    patched = client.patch(f"/admin/keys/{created['id']}", json={"name": "again"}, headers=ADMIN)
    assert patched.status_code == 409 and code(patched) == "key_revoked"
    entries = client.get(f"/admin/audit?key_id={created['id']}", headers=ADMIN).get_json()["data"]
    assert [entry["action"] for entry in entries] == ["key.revoked", "key.created"]


def test_a_change_that_changes_nothing_records_nothing(db_app):
    client = db_app().test_client()
    created = create(client, rate_limit="5/minute")
    for body in ({}, {"rate_limit": "5/minute"}, {"name": None}):
        unchanged = client.patch(f"/admin/keys/{created['id']}", json=body, headers=ADMIN)
        assert unchanged.status_code == 200 and unchanged.get_json()["updated_at"] == created["updated_at"]
    entries = client.get(f"/admin/audit?key_id={created['id']}", headers=ADMIN).get_json()["data"]
    assert [entry["action"] for entry in entries] == ["key.created"]


def test_a_value_that_does_not_match_its_pattern_is_refused_in_words_not_with_the_pattern(client):
    for field, value, words in (("rate_limit", "lots", "write it like 60/minute"), ("name", "a b", "letters, digits"),
                                ("token_budget", "lots", "write it like 50000/day")):  # fmt: skip
        refused = client.post("/admin/keys", json={"name": "team-a", field: value}, headers=ADMIN)
        assert refused.status_code == 422 and code(refused) == "validation_error"
        message = refused.get_json()["error"]["message"]
        assert words in message and "pattern" not in message and "^" not in message, message


def test_a_rotation_says_until_when_the_old_secret_works(db_app):
    client = db_app().test_client()
    created = create(client)
    at_once = client.post(f"/admin/keys/{created['id']}/rotate", headers=ADMIN).get_json()
    assert at_once["previous_valid_until"] is None
    graced = client.post(f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 3600}, headers=ADMIN).get_json()
    until = datetime.fromisoformat(graced["previous_valid_until"])
    assert timedelta(minutes=59) < until - datetime.now(timezone.utc) <= timedelta(hours=1)


def test_the_audit_log_and_usage_of_an_id_no_key_has_are_a_404(db_app):
    client = db_app().test_client()
    for path in ("/admin/audit?key_id=000000000000", "/admin/usage?key_id=000000000000"):
        refused = client.get(path, headers=ADMIN)
        assert refused.status_code == 404 and code(refused) == "key_not_found", path
    # A key of API_KEYS is known by its name: its rows stay readable after it left the setting.
    assert client.get("/admin/usage?key_id=env-gone", headers=ADMIN).status_code == 200


def test_an_audit_limit_out_of_range_is_a_422(client):
    response = client.get("/admin/audit?limit=0", headers=ADMIN)
    assert (response.status_code, code(response)) == (422, "validation_error")


def test_no_secret_or_digest_reaches_an_answer_the_audit_log_the_logs_or_the_metrics(db_app, capsys, caplog):
    app = db_app()
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        created = create(client)
        rotated = client.post(f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 60}, headers=ADMIN).get_json()
        secrets = [created["key"], rotated["key"]]
        for key in secrets:
            generate(client, key)
        client.patch(f"/admin/keys/{created['id']}", json={"name": "renamed"}, headers=ADMIN)
        client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
        generate(client, secrets[1])
        shown = [
            client.get("/admin/keys", headers=ADMIN).get_data(as_text=True),
            client.get(f"/admin/keys/{created['id']}", headers=ADMIN).get_data(as_text=True),
            client.get("/admin/audit", headers=ADMIN).get_data(as_text=True),
            client.get("/metrics", headers=ADMIN).get_data(as_text=True),
            capsys.readouterr().out,
            caplog.text,
        ]
    with app.extensions["genapi"]["database"].engine.connect() as connection:
        shown.append(json.dumps([list(map(str, row)) for row in connection.execute(text("SELECT * FROM audit_log"))]))
    forbidden = []
    for key in secrets:
        secret = key.split("_", 2)[2]
        forbidden += [secret, hashlib.sha256(secret.encode()).hexdigest()]
    for text_shown in shown:
        for value in forbidden:
            assert value not in text_shown


def test_a_grace_period_may_be_a_whole_float_as_json_schema_counts_it(client):
    created = create(client)
    response = client.post(f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 60.0}, headers=ADMIN)
    assert response.status_code == 200
