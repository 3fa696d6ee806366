"""/v1/chat/completions and /v1/models, driven by the official `openai` Python SDK, as OpenAI's clients call them."""

import json

import httpx2
import openai
import pytest

from app import create_app
from tests.conftest import ADMIN_KEY, USER_KEY, make_settings
from tests.fake_openai import Status, Stream
from tests.test_streaming import FAST

MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
def make_sdk(fake_openai):
    """An OpenAI SDK client whose base_url is genapi's /v1, served in-process over WSGI; kwargs override settings."""

    def build(api_key: str | None = USER_KEY, **overrides):
        settings = {"openai_base_url": fake_openai.base_url, "allowed_models": "test-model"} | FAST | overrides
        app = create_app(make_settings(**settings))
        http_client = httpx2.Client(transport=httpx2.WSGITransport(app=app))
        # The SDK will not go without a key: None sends it with an empty Authorization header instead.
        headers = {"Authorization": ""} if api_key is None else None
        return openai.OpenAI(base_url="http://genapi.test/v1", api_key=api_key or "unused", max_retries=0,
                             http_client=http_client, default_headers=headers)

    return build


@pytest.fixture
def sdk(make_sdk):
    return make_sdk()


def test_sdk_completes_a_chat_with_usage(sdk, fake_openai):
    completion = sdk.chat.completions.create(model="test-model", messages=MESSAGES)
    assert completion.choices[0].message.content == "echo: Say hi"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2 and completion.usage.completion_tokens == 3


def test_sdk_streams_a_chat_with_usage_when_asked(sdk, fake_openai):
    chunks = list(sdk.chat.completions.create(
        model="test-model", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: Say hi"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_stream_carries_no_usage_chunk_unless_the_client_asked_but_upstream_is_always_asked(sdk, fake_openai):
    chunks = list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert fake_openai.requests[-1]["body"]["stream_options"] == {"include_usage": True}


def test_request_without_a_model_gets_the_default_model(make_sdk, fake_openai):
    sdk = make_sdk(allowed_models="")
    response = sdk.post("/chat/completions", body={"messages": MESSAGES}, cast_to=httpx2.Response)
    assert response.status_code == 200
    assert fake_openai.requests[-1]["body"]["model"] == "test-model"


def test_max_tokens_defaults_to_the_limit_and_other_fields_pass_through_unchanged(sdk, fake_openai):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    sdk.chat.completions.create(
        model="test-model", messages=MESSAGES, tools=tools, seed=7, stop=["\n"],
        response_format={"type": "json_object"}, extra_body={"made_up_field": {"kept": [1, 2]}},
    )
    sent = fake_openai.requests[-1]["body"]
    assert sent["max_tokens"] == 4096
    assert sent["tools"] == tools and sent["seed"] == 7 and sent["stop"] == ["\n"]
    assert sent["response_format"] == {"type": "json_object"} and sent["made_up_field"] == {"kept": [1, 2]}


def test_a_large_body_of_more_fields_than_genapi_checks_passes_through(sdk, fake_openai):
    # Over the size at which /generate counts unknown fields before pydantic: /v1 takes them all the same.
    others = {"temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": 0.2, "seed": 7,
              "user": "u" * 3000, "metadata": {"team": "search"}, "logprobs": False}
    completion = sdk.chat.completions.create(model="test-model", messages=MESSAGES, **others)
    assert completion.choices[0].message.content == "echo: Say hi"
    sent = fake_openai.requests[-1]["body"]
    assert {name: sent[name] for name in others} == others


def test_answer_comes_back_as_the_model_server_sent_it(make_sdk, fake_openai):
    sdk = make_sdk()
    response = sdk.post("/chat/completions", body={"model": "test-model", "messages": MESSAGES}, cast_to=httpx2.Response)
    assert response.json()["id"].startswith("chatcmpl-fake-") and response.json()["object"] == "chat.completion"


def test_missing_key_is_the_sdks_authentication_error(make_sdk, fake_openai):
    with pytest.raises(openai.AuthenticationError) as raised:
        make_sdk(api_key=None).chat.completions.create(model="test-model", messages=MESSAGES)
    assert raised.value.status_code == 401 and raised.value.code == "missing_api_key"


def test_wrong_key_is_the_sdks_permission_denied_error(make_sdk, fake_openai):
    with pytest.raises(openai.PermissionDeniedError) as raised:
        make_sdk(api_key="not-a-key").chat.completions.create(model="test-model", messages=MESSAGES)
    assert raised.value.status_code == 403 and raised.value.code == "invalid_api_key"


def test_model_the_key_may_not_use_is_not_found_with_no_upstream_call(sdk, fake_openai):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert fake_openai.calls == 0


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
def test_a_whole_float_token_cap_is_the_integer_json_schema_says_it_is_and_goes_upstream_as_one(sdk, fake_openai, cap):
    response = sdk.post("/chat/completions", body={"model": "test-model", "messages": MESSAGES, cap: 10.0},
                        cast_to=httpx2.Response)
    assert response.status_code == 200
    sent = fake_openai.requests[-1]["body"][cap]
    assert (sent, type(sent)) == (10, int)


def test_admin_key_may_use_any_model(make_sdk, fake_openai):
    make_sdk(api_key=ADMIN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert fake_openai.requests[-1]["body"]["model"] == "gpt-4o"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 32001}]}, "messages"),
        ({"stream": "yes"}, "stream"),
        ({"model": 5}, "model"),
    ],
)
def test_what_genapi_checks_is_the_sdks_unprocessable_entity_error(sdk, fake_openai, body, param):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        sdk.post("/chat/completions", body={"model": "test-model", "messages": MESSAGES} | body, cast_to=httpx2.Response)
    assert raised.value.code == "validation_error" and raised.value.param == param
    assert fake_openai.calls == 0


def test_rate_limit_is_the_sdks_rate_limit_error(make_sdk, fake_openai):
    sdk = make_sdk(rate_limit="1/minute")
    sdk.chat.completions.create(model="test-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
    assert raised.value.code == "rate_limit_exceeded"


def test_upstream_refusal_before_the_first_byte_of_a_stream_is_an_sdk_error(sdk, fake_openai):
    fake_openai.then(Status(400, "bad tools"))
    with pytest.raises(openai.BadRequestError) as raised:
        list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    assert raised.value.code == "upstream_rejected_request" and "bad tools" in raised.value.message


def test_stream_cut_by_the_model_server_makes_the_sdk_raise(sdk, fake_openai):
    fake_openai.then(Stream(cut_at=2))
    stream = sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="ended before the answer was complete"):
        list(stream)


def test_stream_ending_without_done_makes_the_sdk_raise(sdk, fake_openai):
    fake_openai.then(Stream(finish=False, usage=False))
    with pytest.raises(openai.APIError):
        list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))


def test_error_after_the_first_byte_makes_the_sdk_raise(sdk, fake_openai):
    fake_openai.then(Stream(error_at=1))
    with pytest.raises(openai.APIError, match="reported an error"):
        list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))


def test_models_lists_the_allowed_models_in_openais_shape(make_sdk, fake_openai):
    models = make_sdk(allowed_models="test-model,other-model").models.list()
    assert [model.id for model in models] == ["test-model", "other-model"]
    assert all(model.object == "model" for model in models)


def test_models_without_allowed_models_lists_the_default_model(make_sdk, fake_openai):
    assert [model.id for model in make_sdk(allowed_models="").models.list()] == ["test-model"]


def test_models_needs_a_key(make_sdk):
    with pytest.raises(openai.AuthenticationError):
        make_sdk(api_key=None).models.list()


def test_x_api_key_header_works_on_v1_too(make_app, fake_openai):
    app = create_app(make_settings(openai_base_url=fake_openai.base_url))
    response = app.test_client().post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 200 and response.get_json()["choices"][0]["message"]["content"] == "echo: Say hi"


def test_body_that_is_not_a_json_object_is_400(make_app, fake_openai):
    client = create_app(make_settings(openai_base_url=fake_openai.base_url)).test_client()
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    assert client.post("/v1/chat/completions", json=[1], headers=headers).get_json()["error"]["code"] == "invalid_json"
    not_json = client.post("/v1/chat/completions", data="{", headers=headers, content_type="application/json")
    assert not_json.status_code == 400
    assert client.post("/v1/chat/completions", data="x", headers=headers).status_code == 415


def test_non_streamed_answers_are_cached_by_the_whole_body_and_the_client(make_sdk, fake_openai):
    sdk = make_sdk(cache_ttl=60)
    first = sdk.chat.completions.create(model="test-model", messages=MESSAGES)
    again = sdk.chat.completions.with_raw_response.create(model="test-model", messages=MESSAGES)
    assert again.headers["X-Cache"] == "HIT" and again.parse().choices[0].message.content == first.choices[0].message.content
    sdk.chat.completions.create(model="test-model", messages=MESSAGES, seed=1)  # another body: another answer
    make_sdk(api_key=ADMIN_KEY, cache_ttl=60).chat.completions.create(model="test-model", messages=MESSAGES)
    assert fake_openai.calls == 3


def test_v1_works_on_the_mock_provider_streamed_and_not(make_app):
    app = make_app(llm_provider="mock", mock_stream_delay=0)
    sdk = openai.OpenAI(base_url="http://genapi.test/v1", api_key=USER_KEY, max_retries=0,
                        http_client=httpx2.Client(transport=httpx2.WSGITransport(app=app)))
    whole = sdk.chat.completions.create(model="test-model", messages=MESSAGES).choices[0].message.content
    chunks = list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole
    assert whole.startswith("Mock answer")


def test_v1_requests_are_logged_once_each(make_sdk, fake_openai, capsys):
    sdk = make_sdk()
    capsys.readouterr()
    sdk.chat.completions.create(model="test-model", messages=MESSAGES)
    list(sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    plain, streamed = [line for line in lines if line["logger"] == "genapi.request"]
    assert plain["path"] == streamed["path"] == "/v1/chat/completions"
    assert plain["prompt_tokens"] == 2 and plain["completion_tokens"] == 3
    assert streamed["stream_ending"] == "completed" and streamed["completion_tokens"] == 3


PATH_MODEL = "/models/tiny-chat.Q4_K_M.gguf"


def test_a_model_named_by_a_path_on_the_servers_disk_comes_back_as_its_files_name(make_sdk, fake_openai):
    completion = make_sdk(allowed_models=PATH_MODEL).chat.completions.create(model=PATH_MODEL, messages=MESSAGES)
    assert completion.model == "tiny-chat.Q4_K_M"
    assert completion.choices[0].message.content == "echo: Say hi"


def test_a_model_named_by_a_path_is_streamed_as_its_files_name_in_every_chunk(make_sdk, fake_openai):
    chunks = list(make_sdk(allowed_models=PATH_MODEL).chat.completions.create(
        model=PATH_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert {chunk.model for chunk in chunks} == {"tiny-chat.Q4_K_M"}
