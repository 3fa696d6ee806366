"""POST /generate/batch: answers in order, a failing prompt's error in its place, concurrency, validation."""

import time

import httpx2

from config import UPSTREAM_BUDGET_SECONDS
from genapi.schemas import BatchResponse, GenerateResponse
from tests.conftest import USER_KEY, make_settings
from tests.test_upstream import upstream_error

from app import create_app


def post_batch(client, key=USER_KEY, headers=None, **body):
    body = {"prompts": ["one", "two", "three"]} | body
    return client.post("/generate/batch", json=body, headers={"X-API-KEY": key} | (headers or {}))


def test_batch_answers_every_prompt_in_order(client):
    response = post_batch(client)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["response"] for r in results] == ["echo: one", "echo: two", "echo: three"]


def test_each_batch_result_is_a_generate_success_body_with_its_own_id(client):
    response = post_batch(client, headers={"X-Request-ID": "batch-7"})
    results = response.get_json()["results"]
    assert [r["id"] for r in results] == ["batch-7-0", "batch-7-1", "batch-7-2"]
    assert set(results[0]) == {"response", "model", "finish_reason", "usage", "id", "cached"}


def test_batch_body_is_exactly_the_batch_response_model(make_app, upstream):
    def fail_on_two(request):
        return upstream_error(500) if b"two" in request.content else upstream.ok(request)

    upstream.then(*[fail_on_two] * 3)
    body = post_batch(make_app().test_client()).get_json()
    BatchResponse.model_validate(body)
    shapes = [list(result) for result in body["results"]]
    assert shapes == [list(GenerateResponse.model_fields), ["error"], list(GenerateResponse.model_fields)]


def test_options_apply_to_every_prompt(client, upstream):
    post_batch(client, max_tokens=3, system="Be brief.", model="test-model")
    assert len(upstream.requests) == 3
    for request in upstream.requests:
        body = request.read().decode()
        assert '"max_tokens":3' in body.replace(" ", "") and "Be brief." in body


def test_a_failing_prompt_shows_its_error_in_place_and_the_others_succeed(make_app, upstream):
    def fail_on_two(request):
        return upstream_error(500) if b"two" in request.content else upstream.ok(request)

    upstream.then(fail_on_two, fail_on_two, fail_on_two)
    results = post_batch(make_app().test_client()).get_json()["results"]
    assert results[0]["response"] == "echo: one"
    error = {"message": "The model server failed (HTTP 500).", "type": "upstream_error", "param": None}
    assert results[1] == {"error": error | {"code": "upstream_error"}}
    assert results[2]["response"] == "echo: three"


def test_a_prompt_the_upstream_rate_limited_says_how_long_to_wait_in_its_message(make_app, upstream):
    def limit_two(request):
        return upstream_error(429, headers={"retry-after": "7"}) if b"two" in request.content else upstream.ok(request)

    upstream.then(limit_two, limit_two, limit_two)
    response = post_batch(make_app().test_client())
    assert response.status_code == 200
    error = response.get_json()["results"][1]["error"]
    assert error["code"] == "upstream_rate_limited"
    assert "retry after 7 seconds" in error["message"]


def test_batch_prompts_are_served_from_the_cache_when_they_can_be(make_app, upstream):
    client = make_app(cache_ttl=60).test_client()
    client.post("/generate", json={"prompt": "two"}, headers={"X-API-KEY": USER_KEY})
    results = post_batch(client).get_json()["results"]
    assert [r["cached"] for r in results] == [False, True, False]
    assert upstream.calls == 3


def test_an_empty_batch_is_422(client):
    response = post_batch(client, prompts=[])
    assert response.status_code == 422
    assert response.get_json()["error"]["param"] == "prompts"


def test_more_prompts_than_batch_max_prompts_is_422(make_app, upstream):
    client = make_app(batch_max_prompts=2).test_client()
    response = post_batch(client)
    assert response.status_code == 422
    assert upstream.calls == 0


def test_a_blank_prompt_in_a_batch_is_422_naming_its_position(client, upstream):
    response = post_batch(client, prompts=["fine", "  "])
    assert response.status_code == 422
    assert response.get_json()["error"]["param"] == "prompts.1"
    assert upstream.calls == 0


def test_batch_refuses_a_single_prompt_field(client):
    response = client.post("/generate/batch", json={"prompt": "x"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 422


def test_a_batch_needs_a_key(client, upstream):
    response = client.post("/generate/batch", json={"prompts": ["x"]})
    assert response.status_code == 401
    assert upstream.calls == 0


def test_a_batch_model_outside_allowed_models_refuses_the_whole_batch(make_app, upstream):
    client = make_app(allowed_models="test-model").test_client()
    response = post_batch(client, model="gpt-5")
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "model_not_allowed"
    assert upstream.calls == 0


def test_batch_calls_run_concurrently_up_to_batch_concurrency(fake_openai):
    fake_openai.delay = 0.3
    settings = make_settings(openai_base_url=fake_openai.base_url, batch_concurrency=3)
    client = create_app(settings).test_client()
    response = post_batch(client, prompts=[f"p{n}" for n in range(6)])
    assert response.status_code == 200
    assert fake_openai.max_in_flight == 3


def test_a_batch_of_8_one_second_prompts_answers_in_under_2_5_seconds_in_order(fake_openai):
    # About as long as its slowest prompt; concurrency itself is proven by the calls the fake saw in flight at once.
    fake_openai.delay = 1
    client = create_app(make_settings(openai_base_url=fake_openai.base_url)).test_client()
    prompts = [f"prompt {n}" for n in range(7)] + ["prompt 7 FAIL:500"]
    started = time.monotonic()
    response = post_batch(client, prompts=prompts)
    elapsed = time.monotonic() - started
    results = response.get_json()["results"]
    assert elapsed < 2.5
    assert fake_openai.max_in_flight == 8
    assert [r["response"] for r in results[:7]] == [f"echo: prompt {n}" for n in range(7)]
    assert results[7]["error"]["code"] == "upstream_error"


def test_a_batch_larger_than_the_keys_whole_limit_is_422_not_a_429_to_wait_out(make_app, upstream):
    client = make_app(rate_limit="2/minute").test_client()
    response = post_batch(client)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "over_rate_limit"
    assert upstream.calls == 0
    assert post_batch(client, prompts=["one", "two"]).status_code == 200


def test_the_upstream_connections_kept_alive_cover_a_full_batch_for_every_request_in_flight():
    provider = create_app(make_settings(openai_base_url="http://upstream.test/v1")).extensions["genapi"]["provider"]
    settings = make_settings()
    transport = provider.client._client._transport
    assert transport._max_idle == settings.in_flight_per_worker * settings.batch_concurrency


def test_a_batch_ends_inside_the_request_budget_however_many_rounds_it_takes(make_app, upstream, monkeypatch):
    now = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    start = now[0]

    def hang(request):  # takes all the time the call was given, on the clock the deadline is read from
        now[0] += request.extensions["timeout"]["read"]
        raise httpx2.ReadTimeout("timed out", request=request)

    upstream.then(*[hang] * 6)
    client = make_app(openai_timeout=10, openai_max_retries=0, batch_concurrency=1).test_client()
    results = post_batch(client, prompts=[f"p{n}" for n in range(6)]).get_json()["results"]
    assert [result["error"]["code"] for result in results] == ["upstream_timeout"] * 6
    assert now[0] - start <= UPSTREAM_BUDGET_SECONDS
    assert upstream.calls == 3  # 10 s, 10 s, then the 5 s left; the last three are never sent
