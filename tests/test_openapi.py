"""GET /openapi.json: a valid OpenAPI 3.1 document, made from the same models and settings that validate requests."""

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from app import create_app
from genapi.docs_page import PAGE_ROUTES
from genapi.errors import ERROR_TYPES, HTTP_ERROR_CODES
from genapi.openapi import ERROR_MEANINGS
from tests.conftest import USER_KEY, make_settings
from tests.fake_openai import Stream
from tests.test_streaming import FAST

ROOT = Path(__file__).resolve().parent.parent


def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_openapi_document_is_valid_openapi_3_1_and_needs_no_key(client):
    spec = document(client)
    assert spec["openapi"].startswith("3.1.")
    validate(spec)


def test_openapi_covers_every_route_and_method_of_the_app_but_the_docs_page(app, client):
    # The docs page (/, /docs/ and its files) is for people, not the API, so neither the document nor the fuzzer has it.
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.rule not in PAGE_ROUTES
    }
    documented = {(path, method) for path, operations in document(client)["paths"].items() for method in operations}
    assert documented == served


def test_openapi_lists_every_error_status_with_the_error_schema(client):
    spec = document(client)
    for status in ERROR_TYPES:
        schema = spec["components"]["responses"][str(status)]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    assert "fields" in detail["properties"]


def test_generate_operation_declares_its_errors_key_and_request_id(client):
    operation = document(client)["paths"]["/generate"]["post"]
    assert {"400", "401", "403", "413", "415", "422", "429", "500", "502", "503", "504"} <= set(operation["responses"])
    assert operation["security"] == [{"ApiKey": []}]
    assert "X-Request-ID" in operation["responses"]["200"]["headers"]


def test_api_key_scheme_is_the_x_api_key_header(client):
    scheme = document(client)["components"]["securitySchemes"]["ApiKey"]
    assert scheme == scheme | {"type": "apiKey", "in": "header", "name": "X-API-KEY"}


def test_public_routes_declare_no_security(client):
    paths = document(client)["paths"]
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/openapi.json"]["get"]["security"] == []


def test_request_schema_carries_the_limits_from_settings(make_app):
    spec = document(make_app(max_prompt_chars=123, max_tokens_limit=77).test_client())
    fields = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert fields["prompt"]["maxLength"] == 123
    assert fields["max_tokens"]["maximum"] == 77
    assert spec["components"]["schemas"]["GenerateRequest"]["additionalProperties"] is False


def test_request_schema_matches_validation_at_the_prompt_limit(make_app):
    client = make_app(max_prompt_chars=10).test_client()
    headers = {"X-API-KEY": USER_KEY}
    assert client.post("/generate", json={"prompt": "x" * 10}, headers=headers).status_code == 200
    assert client.post("/generate", json={"prompt": "x" * 11}, headers=headers).status_code == 422


def test_allowed_models_are_named_in_the_model_fields_description(make_app):
    spec = document(make_app(allowed_models="small,large").test_client())
    for request_model in ("GenerateRequest", "BatchRequest"):
        model = spec["components"]["schemas"][request_model]["properties"]["model"]
        assert "small, large" in model["description"]
        assert "enum" not in str(model)  # admins may use any model, so the schema must not forbid the others


def test_a_whole_float_max_tokens_is_the_integer_json_schema_says_it_is_and_goes_upstream_as_one(generate, upstream):
    assert generate(max_tokens=10.0).status_code == 200
    sent = json.loads(upstream.requests[0].content)["max_tokens"]
    assert (sent, type(sent)) == (10, int)


@pytest.mark.parametrize("value", [10.5, "10", True, [10]])
def test_a_max_tokens_that_is_not_an_integer_is_refused(generate, value):
    response = generate(max_tokens=value)
    assert (response.status_code, response.get_json()["error"]["param"]) == (422, "max_tokens")


def test_the_document_says_which_numbers_max_tokens_takes(client):
    max_tokens = document(client)["components"]["schemas"]["GenerateRequest"]["properties"]["max_tokens"]
    assert max_tokens["type"] == "integer"
    assert "50.0" in max_tokens["description"] and "50.5" in max_tokens["description"]


def test_the_documents_not_blank_pattern_and_the_check_agree_on_every_white_space(make_app, upstream):
    client = make_app().test_client()
    pattern = document(client)["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"]["pattern"]
    white_space = [chr(code) for code in range(0x110000) if chr(code).isspace()]
    for character in white_space + ["\ufeff"]:
        accepted = client.post("/generate", json={"prompt": character}, headers={"X-API-KEY": USER_KEY})
        assert (accepted.status_code == 200) == bool(re.search(pattern, character)), repr(character)


def test_every_error_code_genapi_gives_is_explained_in_the_openapi_document_and_the_errors_page():
    source = "".join(path.read_text() for path in [ROOT / "app.py", *sorted((ROOT / "genapi").glob("*.py"))])
    codes = set(re.findall(r'code="([a-z_]+)"', source))
    codes |= set(re.findall(r'too_many_requests\(message, "([a-z_]+)"', source))
    codes |= set(HTTP_ERROR_CODES.values())
    assert {"upstream_timeout", "rate_limit_exceeded", "too_many_auth_failures", "not_found"} <= codes
    explained = " ".join(ERROR_MEANINGS.values())
    errors_table = (ROOT / "docs" / "errors.md").read_text()  # the README's "Errors" links it
    for code in codes:
        assert f"({code}" in explained or f" {code}," in explained or f" {code})" in explained, code
        assert f"`{code}`" in errors_table, code


def test_streaming_routes_declare_their_event_streams(client):
    paths = document(client)["paths"]
    generate = paths["/generate"]["post"]["responses"]["200"]["content"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(generate) == set(chat) == {"application/json", "text/event-stream"}
    assert generate["text/event-stream"]["schema"]["properties"]["event"]["enum"] == ["delta", "done", "error"]
    assert "[DONE]" in chat["text/event-stream"]["schema"]["description"]


def test_v1_routes_take_the_key_as_a_bearer_token_too(client):
    spec = document(client)
    assert spec["components"]["securitySchemes"]["Bearer"] == spec["components"]["securitySchemes"]["Bearer"] | {
        "type": "http", "scheme": "bearer"}
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get")):
        assert spec["paths"][path][method]["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert spec["paths"]["/generate"]["post"]["security"] == [{"ApiKey": []}]


def events_as_read(text: str) -> list[dict]:
    """An event stream as an SSE client reads it (WHATWG): comments skipped, `event` "message" when absent."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = [line.split(":", 1) for line in lines]
        event = {"event": "message", "data": "\n".join(value.removeprefix(" ") for name, value in fields if name == "data")}
        event |= {name: value.removeprefix(" ") for name, value in fields if name not in ("data", "")}
        events.append(event)
    return events


@pytest.mark.parametrize("ending", ["done", "error"])
@pytest.mark.parametrize(
    ("path", "body"),
    [("/generate", {"prompt": "Say hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}]})],
)
def test_every_event_of_a_stream_matches_the_documents_event_schema(fake_openai, path, body, ending):
    app = create_app(make_settings(openai_base_url=fake_openai.base_url, **FAST))
    client = app.test_client()
    fake_openai.then(Stream(error_at=2) if ending == "error" else Stream())
    response = client.post(path, json=body | {"stream": True}, headers={"X-API-KEY": USER_KEY})
    assert response.mimetype == "text/event-stream"
    events = events_as_read(response.get_data(as_text=True))
    schema = document(client)["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    validator = Draft202012Validator(schema)
    assert len(events) > 2 and [event for event in events if not validator.is_valid(event)] == []
    last = json.loads(events[-1]["data"]) if events[-1]["data"] != "[DONE]" else "[DONE]"
    assert ("error" in last) == (ending == "error")
