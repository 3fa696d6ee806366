"""CORS_ORIGINS: browser pages on the listed origins may call the API; no other origin, and none by default."""

import pytest

from tests.conftest import USER_KEY

LISTED = "http://app.example.test"
OTHER = "http://elsewhere.example.test"


def preflight(client, origin):
    return client.options(
        "/generate",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key",
        },
    )


@pytest.fixture
def cors_client(make_app):
    return make_app(cors_origins=f"{LISTED}, http://second.example.test").test_client()


def test_a_listed_origins_preflight_is_answered_with_what_it_may_send(cors_client):
    response = preflight(cors_client, LISTED)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == LISTED
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "x-api-key" in response.headers["Access-Control-Allow-Headers"].lower()


def test_a_listed_origins_call_may_read_the_answer_and_its_request_id(cors_client):
    response = cors_client.post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": USER_KEY, "Origin": LISTED})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == LISTED
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]


def test_another_origins_preflight_gets_no_cors_headers(cors_client):
    response = preflight(cors_client, OTHER)
    assert response.status_code == 405
    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_cors_origins_no_origin_is_allowed(client):
    response = preflight(client, LISTED)
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_star_allows_any_origin(make_app):
    response = preflight(make_app(cors_origins="*").test_client(), OTHER)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == OTHER
