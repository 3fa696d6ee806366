"""X-API-KEY: 401 without a key, 403 for a wrong one, hashed and named entries, never in the query string."""

import hashlib

import pytest

from config import load_settings
from tests.conftest import USER_KEY


def test_missing_key_is_401(client, upstream):
    response = client.post("/generate", json={"prompt": "hi"})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "missing_api_key"
    assert upstream.calls == 0


def test_wrong_key_is_403(client, upstream):
    response = client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": "not-a-key"})
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "invalid_api_key"
    assert upstream.calls == 0


def test_key_in_query_string_is_not_accepted(client, upstream):
    for name in ("api_key", "X-API-KEY", "key"):
        response = client.post(f"/generate?{name}={USER_KEY}", json={"prompt": "hi"})
        assert response.status_code == 401
    assert upstream.calls == 0


def test_auth_is_checked_before_the_body(client):
    response = client.post("/generate", data="not json", headers={"X-API-KEY": "wrong"})
    assert response.status_code == 403


def test_sha256_entry_accepts_its_key(make_app):
    digest = hashlib.sha256(b"hashed-key-42").hexdigest()
    client = make_app(api_keys=f"sha256:{digest}").test_client()
    assert client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": "hashed-key-42"}).status_code == 200
    assert client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": digest}).status_code == 403


def test_named_sha256_entry_accepts_its_key(make_app):
    digest = hashlib.sha256(b"bobs-key").hexdigest()
    client = make_app(api_keys=f"one,bob:sha256:{digest}, three").test_client()
    for key in ("one", "bobs-key", "three"):
        assert client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": key}).status_code == 200


def test_key_comparison_is_exact(make_app):
    client = make_app(api_keys="Secret-Key").test_client()
    for near_miss in ("secret-key", "Secret-Key ", "Secret-Ke", "Secret-Key1"):
        assert client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": near_miss}).status_code == 403


@pytest.mark.parametrize("entry", ["sha256:abc", "sha256:" + "z" * 64, ":key", "name:"])
def test_malformed_key_entry_stops_start_up_naming_api_keys(entry, capsys, monkeypatch):
    monkeypatch.setenv("API_KEYS", entry)
    with pytest.raises(SystemExit):
        load_settings(_env_file=None)
    assert "API_KEYS:" in capsys.readouterr().err


def test_a_missing_keys_401_says_where_keys_come_from(client):
    message = client.post("/generate", json={"prompt": "x"}).get_json()["error"]["message"]
    assert "X-API-KEY" in message and "API_KEYS" in message and ".env" in message


def test_a_bearer_key_on_generate_is_401_saying_bearer_is_for_v1_only(client, upstream):
    response = client.post("/generate", json={"prompt": "x"}, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert response.status_code == 401
    error = response.get_json()["error"]
    assert error["code"] == "missing_api_key"
    assert "X-API-KEY" in error["message"] and "/v1/* only" in error["message"]
    assert USER_KEY not in response.get_data(as_text=True)
    assert upstream.calls == 0
