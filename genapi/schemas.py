"""The request and response bodies, as pydantic models: they validate requests and shape every answer."""

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from genapi.errors import ApiError


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    """What POST /generate answers with."""

    response: str = Field(description="The generated text.")
    model: str = Field(description="The model that answered; 'mock' for the offline mock provider.")
    finish_reason: str | None = Field(description="Why generation stopped: 'stop', 'length', ...")
    usage: Usage
    id: str = Field(description="The request id, also in the X-Request-ID header; in a batch, `<id>-<position>`.")
    cached: bool = Field(default=False, description="Whether the answer came from the response cache.")


class HealthResponse(BaseModel):
    """What GET /healthz answers with."""

    status: Literal["ok"]


class ReadyResponse(BaseModel):
    """What GET /readyz answers with when the service is ready."""

    status: Literal["ready"]


class FieldError(BaseModel):
    param: str = Field(description="The failing field, dotted for nested ones.")
    message: str


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="The error's class: invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable code to branch on: missing_api_key, validation_error, ...")
    fields: list[FieldError] | None = Field(default=None, description="On a 422: each failing field and why.")


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    error: ErrorDetail


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """What GET /v1/models answers with, in OpenAI's shape: the models this key may ask for."""

    object: Literal["list"]
    data: list[ModelEntry]


def _whole_float_to_int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON has one number type, and JSON Schema (OpenAPI 3.1's dialect) defines integers by value: 10.0 is the integer 10,
# which the document cannot tell from 10, and schema-based clients and fuzzers send it. Strict mode alone would refuse
# it, so a whole float becomes an int (and goes upstream as 10); "10", true and 10.5 stay refused.
WholeNumber = Annotated[int, BeforeValidator(_whole_float_to_int)]


class BatchResponse(BaseModel):
    """What POST /generate/batch answers with: one entry per prompt, in order, each a success or an error."""

    results: list[GenerateResponse | ErrorResponse]




# Some character that is not white space, spelt out (Python's str.isspace set) rather than as \S, which means
# different things in Python and in the JSON Schema regex dialect: the document and the check must agree.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_not_blank = re.compile(NOT_BLANK)


def not_blank(value: str) -> str:
    if not _not_blank.search(value):
        raise ValueError("must not be blank")
    return value


def build_request_models(max_prompt_chars: int, max_tokens_limit: int, batch_max_prompts: int = 16):
    """The request models, with the limits the settings give, by name: GenerateRequest and BatchRequest."""

    # The pattern tells the OpenAPI document what not_blank enforces (not_blank gives the clearer message).
    Prompt = Annotated[
        str,
        StringConstraints(min_length=1, max_length=max_prompt_chars),
        AfterValidator(not_blank),
        Field(json_schema_extra={"pattern": NOT_BLANK}),
    ]

    class GenerationOptions(BaseModel):
        # strict: "10" is not a number; forbid: a misspelt field is an error, not silently ignored.
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

        max_tokens: WholeNumber = Field(
            default=50,
            ge=1,
            le=max_tokens_limit,
            description="Most tokens to generate: an integer, as JSON Schema counts one (50 or 50.0; not 50.5 or \"50\").",
        )
        temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
        model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
            default=None, description="Model to use; the default is OPENAI_MODEL."
        )
        system: Annotated[str, StringConstraints(max_length=max_prompt_chars)] | None = Field(
            default=None, description="System instructions sent before the prompt."
        )

    class GenerateRequest(GenerationOptions):
        """The body of POST /generate."""

        prompt: Prompt = Field(description="The text to complete; not blank.")
        stream: bool = Field(
            default=False,
            description="Answer as a stream of server-sent events (text/event-stream): `delta` events with the "
            "text as it arrives, then one `done` event, or an `error` event.",
        )

    class BatchRequest(GenerationOptions):
        """The body of POST /generate/batch: the options apply to every prompt."""

        prompts: list[Prompt] = Field(
            min_length=1, max_length=batch_max_prompts, description="The texts to complete, answered in this order."
        )

    # Inside the optional type, so that the document shows the bounds as JSON Schema's minimum and maximum.
    TokenCount = Annotated[Annotated[int, Field(ge=1, le=max_tokens_limit)], BeforeValidator(_whole_float_to_int)]

    class ChatCompletionRequest(BaseModel):
        """The body of POST /v1/chat/completions: OpenAI's, with only what genapi answers for checked here.

        Every other field (tools, response_format, seed, stop, ...) goes to the model server as sent.
        """

        model_config = ConfigDict(extra="allow", strict=True)

        messages: list[dict[str, Any]] = Field(
            min_length=1, description=f"The conversation; at most {max_prompt_chars} characters of text in all."
        )
        model: Annotated[str, StringConstraints(min_length=1)] | None = Field(
            default=None, description="Model to use; the default is OPENAI_MODEL."
        )
        max_tokens: TokenCount | None = Field(
            default=None, description="Most tokens to generate; without it or max_completion_tokens, MAX_TOKENS_LIMIT. "
            "An integer as JSON Schema counts one: 10.0 is sent on as 10.",
        )
        max_completion_tokens: TokenCount | None = Field(
            default=None, description="OpenAI's newer name for max_tokens, checked and sent on the same way."
        )
        n: Literal[1] | None = Field(default=None, description="genapi answers with one choice.")
        stream: bool | None = Field(default=None, description="Answer as OpenAI's stream of `data:` chunks.")
        stream_options: dict[str, Any] | None = Field(
            default=None, description="With include_usage: true, the stream ends with a usage chunk."
        )

    return {"GenerateRequest": GenerateRequest, "BatchRequest": BatchRequest,
            "ChatCompletionRequest": ChatCompletionRequest}


MAX_LISTED_PROBLEMS = 20
MAX_PARAM_CHARS = 100


def param_name(location: tuple) -> str:
    """A failing field's dotted path ("prompts.3"), cut short: a client chooses the names of unknown fields."""
    return ".".join(str(part) for part in location)[:MAX_PARAM_CHARS]


def unknown_fields(model: type[BaseModel], raw: bytes) -> list[str] | None:
    """The names of a large body's fields that the model does not know, if it forbids them and has fewer.

    Found with the C JSON parser before pydantic, which builds an error for every unknown field: a 1 MB body of
    80,000 of them cost a gevent worker a third of a second of CPU. A model that allows unknown fields
    (ChatCompletionRequest: OpenAI's other fields go upstream as sent) has none to refuse.
    """
    if model.model_config.get("extra") != "forbid":
        return None
    if len(raw) < LARGE_BODY_BYTES:  # a small body cannot hold enough fields to matter
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # pydantic says what is wrong with it
    if not isinstance(body, dict) or len(body) <= len(model.model_fields):
        return None
    return [name for name in body if name not in model.model_fields]


LARGE_BODY_BYTES = 2 * 1024


def refuse(problems: list[dict]):
    """The 422 for pydantic-shaped problems, listing at most MAX_LISTED_PROBLEMS of them."""
    # A body of thousands of unknown fields, or of one with a huge name, must not get an answer larger than itself.
    listed = problems[:MAX_LISTED_PROBLEMS]
    fields = [{"param": param_name(p["loc"]), "message": p["msg"]} for p in listed]
    summary = "; ".join(f"{f['param']}: {f['message']}" for f in fields)
    if len(problems) > len(listed):
        summary += f"; and {len(problems) - len(listed)} more"
    return ApiError(422, f"Invalid request: {summary}", code="validation_error", param=fields[0]["param"], fields=fields)


def parse_body(model: type[BaseModel], raw: bytes):
    """Validate a raw JSON body against a model: 400 when it is not a JSON object, 422 when a field is wrong."""
    unknown = unknown_fields(model, raw)
    if unknown:
        raise refuse([{"loc": (name,), "msg": "Extra inputs are not permitted"} for name in unknown])
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
        if any(p["type"] == "model_type" and not p["loc"] for p in problems):
            raise ApiError(400, "The body must be a JSON object.", code="invalid_json") from None
        raise refuse(problems) from None


def read_body() -> bytes:
    """The request's raw body: 415 unless it is declared JSON, 413 past MAX_CONTENT_LENGTH."""
    if not request.is_json:
        raise ApiError(415, "The body must be JSON, sent with Content-Type: application/json.", code="unsupported_media_type")
    body = request.get_data(cache=False)
    # A chunked body has no Content-Length to refuse up front, and Werkzeug stops reading it at the limit, silently:
    # one more byte from the server's own stream tells a body of exactly the limit from a longer one.
    if request.content_length is None and len(body) >= request.max_content_length:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return body
