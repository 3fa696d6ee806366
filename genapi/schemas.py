"""The request and response bodies, as pydantic models: they validate requests and shape every answer."""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    fields: list[dict] | None = Field(default=None, description="On a 422: each failing field and why.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def build_request_models(max_prompt_chars: int, max_tokens_limit: int, batch_max_prompts: int = 16):
    """The request models, with the limits the settings give; returns the GenerateRequest and BatchRequest classes."""

    Prompt = Annotated[str, StringConstraints(min_length=1, max_length=max_prompt_chars), AfterValidator(not_blank)]

    class GenerationOptions(BaseModel):
        # strict: "10" is not a number; forbid: a misspelt field is an error, not silently ignored.
        model_config = ConfigDict(extra="forbid", strict=True)

        max_tokens: int = Field(default=50, ge=1, le=max_tokens_limit, description="Most tokens to generate.")
        temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
        model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
            default=None, description="Model to use; the default is OPENAI_MODEL."
        )
        system: Annotated[str, StringConstraints(max_length=max_prompt_chars)] | None = Field(
            default=None, description="System instructions sent before the prompt."
        )

    class GenerateRequest(GenerationOptions):
        """The body of POST /generate."""

        prompt: Prompt = Field(description="The text to complete.")

    class BatchRequest(GenerationOptions):
        """The body of POST /generate/batch: the options apply to every prompt."""

        prompts: list[Prompt] = Field(
            min_length=1, max_length=batch_max_prompts, description="The texts to complete, answered in this order."
        )

    return GenerateRequest, BatchRequest


def parse_body(model: type[BaseModel], raw: bytes):
    """Validate a raw JSON body against a model: 400 when it is not a JSON object, 422 when a field is wrong."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
        if any(p["type"] == "model_type" and not p["loc"] for p in problems):
            raise ApiError(400, "The body must be a JSON object.", code="invalid_json") from None
        fields = [{"param": ".".join(str(part) for part in p["loc"]), "message": p["msg"]} for p in problems]
        summary = "; ".join(f"{f['param']}: {f['message']}" for f in fields)
        raise ApiError(
            422, f"Invalid request: {summary}", code="validation_error", param=fields[0]["param"], fields=fields
        ) from None
