"""POST /generate: the success body, the request fields, and validation (422, 400, 415, 413)."""

import io
import json

from genapi.schemas import GenerateResponse
from tests.conftest import USER_KEY


def test_generate_returns_text_model_usage_finish_reason_and_id(generate):
    response = generate(prompt="Tell me a joke.", max_tokens=50)
    assert response.status_code == 200
    body = response.get_json()
    assert body["response"] == "echo: Tell me a joke."
    assert body["model"] == "test-model"
    assert body["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert body["id"] == response.headers["X-Request-ID"]


def test_generate_sends_prompt_system_model_and_options_upstream(generate, upstream):
    generate(prompt="hi", system="be brief", model="other-model", max_tokens=7, temperature=0.5)
    sent = json.loads(upstream.requests[0].content)
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert sent["model"] == "other-model"
    assert sent["max_tokens"] == 7
    assert sent["temperature"] == 0.5


def test_max_tokens_defaults_to_50_and_temperature_is_left_out(generate, upstream):
    generate()
    sent = json.loads(upstream.requests[0].content)
    assert sent["max_tokens"] == 50
    assert "temperature" not in sent


def test_finish_reason_length_when_max_tokens_cuts_the_answer(generate):
    body = generate(prompt="one two three four", max_tokens=2).get_json()
    assert body["finish_reason"] == "length"
    assert body["response"] == "echo: one"


def test_client_request_id_is_echoed(generate):
    response = generate(headers={"X-Request-ID": "my-trace-123"})
    assert response.headers["X-Request-ID"] == "my-trace-123"
    assert response.get_json()["id"] == "my-trace-123"


def test_insane_request_id_is_replaced(generate):
    response = generate(headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert response.headers["X-Request-ID"] != "bad id\twith spaces" + "x" * 200
    assert len(response.headers["X-Request-ID"]) == 32


def test_errors_carry_a_request_id(client):
    assert client.post("/generate", json={"prompt": "x"}).headers["X-Request-ID"]


def assert_422(response, param, upstream, code="validation_error"):
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert param in [field["param"] for field in error["fields"]]
    assert upstream.calls == 0


def test_missing_prompt_is_422(client, upstream):
    assert_422(client.post("/generate", json={}, headers={"X-API-KEY": USER_KEY}), "prompt", upstream)


def test_blank_prompt_is_422(generate, upstream):
    assert_422(generate(prompt="   \n"), "prompt", upstream)


def test_prompt_over_max_prompt_chars_is_422(make_app, upstream):
    client = make_app(max_prompt_chars=10).test_client()
    response = client.post("/generate", json={"prompt": "x" * 11}, headers={"X-API-KEY": USER_KEY})
    assert_422(response, "prompt", upstream)


def test_prompt_that_is_not_a_string_is_422(generate, upstream):
    assert_422(generate(prompt=42), "prompt", upstream)


def test_max_tokens_as_string_is_422(generate, upstream):
    assert_422(generate(max_tokens="10"), "max_tokens", upstream)


def test_max_tokens_as_boolean_is_422(generate, upstream):
    assert_422(generate(max_tokens=True), "max_tokens", upstream)


def test_max_tokens_below_1_is_422(generate, upstream):
    assert_422(generate(max_tokens=0), "max_tokens", upstream)


def test_max_tokens_over_max_tokens_limit_is_422(make_app, upstream):
    client = make_app(max_tokens_limit=100).test_client()
    response = client.post("/generate", json={"prompt": "x", "max_tokens": 101}, headers={"X-API-KEY": USER_KEY})
    assert_422(response, "max_tokens", upstream)


def test_temperature_out_of_range_is_422(generate, upstream):
    assert_422(generate(temperature=2.5), "temperature", upstream)


def test_an_unknown_field_with_a_huge_name_gets_a_422_naming_it_in_short(generate, upstream):
    response = generate(**{"x" * 100_000: 1})
    assert response.status_code == 422
    assert len(response.data) < 1000
    assert response.get_json()["error"]["param"] == "x" * 100


def test_temperature_nan_is_422_asking_for_a_finite_number(client, upstream):
    body = b'{"prompt": "hi", "temperature": NaN}'
    response = client.post("/generate", data=body, headers={"X-API-KEY": USER_KEY, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert "finite number" in response.get_json()["error"]["message"]
    assert upstream.calls == 0


def test_unknown_field_is_422(generate, upstream):
    assert_422(generate(max_token=10), "max_token", upstream)


def test_each_failing_field_is_listed(generate, upstream):
    response = generate(max_tokens="10", temperature=-1)
    params = [field["param"] for field in response.get_json()["error"]["fields"]]
    assert set(params) == {"max_tokens", "temperature"}


def test_a_body_of_many_unknown_fields_gets_a_422_listing_only_the_first_twenty(generate, upstream):
    response = generate(**{f"field{n}": n for n in range(500)})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert len(error["fields"]) == 20
    assert error["message"].endswith("; and 480 more")
    assert upstream.calls == 0


def test_model_outside_allowed_models_is_422_naming_the_allowed_ones(make_app, upstream):
    client = make_app(allowed_models="small,large").test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "huge"}, headers={"X-API-KEY": USER_KEY})
    assert_422(response, "model", upstream, code="model_not_allowed")
    assert "small, large" in response.get_json()["error"]["message"]


def test_model_inside_allowed_models_is_served(make_app):
    client = make_app(allowed_models="small,large").test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "large"}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 200
    assert response.get_json()["model"] == "large"


def test_invalid_json_is_400(client, upstream):
    response = client.post(
        "/generate", data="{not json", content_type="application/json", headers={"X-API-KEY": USER_KEY}
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"
    assert upstream.calls == 0


def test_json_that_is_not_an_object_is_400(client, upstream):
    response = client.post("/generate", json=["Tell me a joke."], headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 400
    assert "JSON object" in response.get_json()["error"]["message"]
    assert upstream.calls == 0


def test_body_that_is_not_json_is_415(client, upstream):
    response = client.post("/generate", data="prompt=hi", headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"
    assert upstream.calls == 0


def test_body_over_max_content_length_is_413(make_app, upstream):
    client = make_app(max_content_length=2048).test_client()
    response = client.post("/generate", json={"prompt": "x" * 4096}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "body_too_large"
    assert upstream.calls == 0


def post_chunked(client, body: bytes):
    """A body sent with Transfer-Encoding: chunked, as gunicorn hands it over: no length, a terminated stream."""
    return client.post(
        "/generate", input_stream=io.BytesIO(body), environ_overrides={"wsgi.input_terminated": True},
        headers={"X-API-KEY": USER_KEY, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )


def test_chunked_body_over_max_content_length_is_413_even_when_its_start_is_valid_json(make_app, upstream):
    response = post_chunked(make_app(max_content_length=2048).test_client(), b'{"prompt": "hi"}' + b" " * 4096)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "body_too_large"
    assert upstream.calls == 0


def test_chunked_body_under_max_content_length_is_answered(make_app):
    assert post_chunked(make_app(max_content_length=2048).test_client(), b'{"prompt": "hi"}').status_code == 200


def test_chunked_body_of_exactly_max_content_length_is_answered(make_app):
    body = b'{"prompt": "hi"}'.ljust(2048)
    assert post_chunked(make_app(max_content_length=2048).test_client(), body).status_code == 200


def test_unknown_route_is_404_json(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "not_found_error"


def test_wrong_method_is_405_json_with_allow(client):
    response = client.get("/generate")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_unexpected_error_is_500_json_without_traceback(app, generate, upstream):
    upstream.then(RuntimeError("a bug, with /secret/path in it"))
    app.config["TESTING"] = False  # a test app would re-raise; production must not
    response = generate()
    assert response.status_code == 500
    assert response.get_json() == {
        "error": {"message": "Internal error; it has been logged.", "type": "server_error", "param": None,
                  "code": "internal_error"}
    }
    assert generate().status_code == 200


def test_healthz_needs_no_key_and_calls_no_upstream(client, upstream):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert upstream.calls == 0


def test_success_body_is_exactly_the_generate_response_model(generate):
    body = generate().get_json()
    assert list(body) == list(GenerateResponse.model_fields)
    assert GenerateResponse.model_validate(body).model_dump() == body


def test_options_is_405_json_not_an_empty_html_page(client):
    response = client.options("/generate")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"


def test_a_large_body_of_unknown_fields_is_refused_before_pydantic_validates_it(app, client, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("pydantic was asked to validate a body that is refused for its field count")

    monkeypatch.setattr(app.extensions["genapi"]["GenerateRequest"], "model_validate_json", never)
    body = {"prompt": "hi"} | {f"f{n:05d}": 1 for n in range(60_000)}
    response = client.post("/generate", json=body, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], len(error["fields"]), error["fields"][0]["param"]) == ("validation_error", 20, "f00000")
