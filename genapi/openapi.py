"""The OpenAPI 3.1 document of GET /openapi.json, built from the pydantic models that validate and shape requests.

The schemas come from the models themselves (with the limits the settings gave them), so the document cannot
drift from what the service accepts and answers. Each route is one entry in ROUTES; a new route is one more entry
(and, if it reads a body, its request model passed to build_openapi by the name its entry gives).
"""

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from genapi.errors import ERROR_TYPES
from genapi.schemas import BatchResponse, ErrorResponse, GenerateResponse, HealthResponse, ModelList, ReadyResponse

SECURITY_SCHEME = "ApiKey"
BEARER_SCHEME = "Bearer"  # /v1 takes the key as OpenAI's clients send it, too

GENERATE_EVENTS = (
    'With "stream": true, the answer is text/event-stream: `event: delta` with `data: {"text": "..."}` for each '
    "piece of text as the model sends it, then one `event: done` whose data holds model, finish_reason, usage "
    "(with `estimated: true` when the model server sent none), id and cached; or, if the stream fails after its "
    'first byte, one `event: error` whose data is the error shape, {"error": {...}}, and no done. Lines starting '
    "with `:` are heartbeats, sent while the model is silent. An error before the first byte is the ordinary JSON "
    "error with its status."
)
GENERATE_EVENT = {
    "type": "object",
    "description": GENERATE_EVENTS,
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["delta", "done", "error"]},
        "data": {"type": "string", "description": 'JSON: {"text"}, the success fields, or {"error": {...}}.'},
    },
}
CHAT_EVENTS = (
    'With "stream": true, OpenAI\'s stream: `data: {chunk}` lines as the model server sent them, then '
    '`data: [DONE]`; a usage chunk only with stream_options.include_usage. If the stream fails after its first byte, '
    'one `data: {"error": {...}}` line and no [DONE]. Lines starting with `:` are heartbeats.'
)
CHAT_EVENT = {
    "type": "object",
    "description": CHAT_EVENTS,
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "JSON: a chat.completion.chunk, or [DONE], or {\"error\"}."}},
}

ERROR_MEANINGS = {
    400: "The body is not valid JSON or not a JSON object (invalid_json), or the model server refused the request "
    "itself (upstream_rejected_request).",
    401: "No X-API-KEY header (missing_api_key).",
    403: "The key is not accepted (invalid_api_key), or the route needs an admin key (admin_only).",
    404: "No such route (not_found), or, on /v1, a model this key may not use (model_not_found).",
    405: "The route does not take this method (method_not_allowed); the Allow header lists those it takes.",
    413: "The body is larger than MAX_CONTENT_LENGTH (body_too_large).",
    415: "The body is not sent as application/json (unsupported_media_type).",
    422: "A field is missing, of the wrong type, out of range or unknown (validation_error), or the model is not "
    "in ALLOWED_MODELS (model_not_allowed), or a batch has more prompts than the key's whole rate limit "
    "(over_rate_limit); error.fields lists each failing field.",
    429: "A rate limit refused the request: the key's RATE_LIMIT (rate_limit_exceeded) or this address's failed "
    "authentications (too_many_auth_failures); retry after the Retry-After header's seconds.",
    500: "A bug in genapi (internal_error); it is logged.",
    502: "The model server failed, could not be reached, answered with something unusable, refused genapi's "
    "credentials, or says genapi's account is out of quota (upstream_error, upstream_unavailable, "
    "upstream_bad_response, upstream_auth, upstream_quota_exceeded).",
    503: "The model server is rate-limiting or overloaded (upstream_rate_limited); retry after Retry-After seconds. "
    "On /readyz: Redis does not answer (redis_unavailable). In a stream's error event only: the server is "
    "restarting and cut the stream short (server_shutting_down).",
    504: "The model server did not answer in time (upstream_timeout).",
}
RETRY_AFTER_STATUSES = (429, 503)

# The errors any route can give, and those of a route that reads a JSON body and calls the model.
ALWAYS = (500,)
KEYED = (401, 403, 429)
JSON_BODY = (400, 413, 415, 422)
MODEL_CALL = (502, 503, 504)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    summary: str
    answer: str | type[BaseModel]  # a model for a JSON answer; a media type for anything else
    errors: tuple[int, ...] = ALWAYS
    body: str | None = None  # the name of the request model, from the models create_app built
    auth: str | None = None  # None, "key" or "admin"
    description: str = ""
    events: dict | None = None  # the schema of one event of the route's text/event-stream answer, if it streams
    bearer: bool = False  # the key may come as Authorization: Bearer, too


ROUTES = [
    Route(
        "/generate", "post", "Generate text from a prompt", GenerateResponse,
        errors=ALWAYS + KEYED + JSON_BODY + MODEL_CALL, body="GenerateRequest", auth="key",
        description="One prompt in, the model's text out. Types are strict and unknown fields are refused.",
        events=GENERATE_EVENT,
    ),
    Route(
        "/generate/batch", "post", "Generate text for several prompts", BatchResponse,
        errors=ALWAYS + KEYED + JSON_BODY + MODEL_CALL, body="BatchRequest", auth="key",
        description="The same options for every prompt; one result per prompt, in order, each a success or an "
        "error. Each prompt counts as one request against the key's rate limit.",
    ),
    Route(
        "/v1/chat/completions", "post", "OpenAI's Chat Completions, streamed or not", "application/json",
        errors=ALWAYS + KEYED + JSON_BODY + (404,) + MODEL_CALL, body="ChatCompletionRequest", auth="key",
        bearer=True, events=CHAT_EVENT,
        description="For OpenAI's clients, with base_url <genapi>/v1. genapi checks the key, the model (ALLOWED_MODELS), "
        "max_tokens and max_completion_tokens (MAX_TOKENS_LIMIT), the size of the messages and n; every other field "
        "goes to the model server as sent, and its answer (a chat.completion) comes back as it sent it.",
    ),
    Route(
        "/v1/models", "get", "The models this key may ask for, in OpenAI's shape", ModelList,
        errors=ALWAYS + KEYED, auth="key", bearer=True,
        description="ALLOWED_MODELS, or without it the default model, OPENAI_MODEL.",
    ),
    Route("/healthz", "get", "The process is up", HealthResponse, description="No key and no upstream call."),
    Route(
        "/readyz", "get", "Ready to serve: the configuration is valid and Redis, if configured, answers",
        ReadyResponse, errors=ALWAYS + (503,), description="No key and no upstream call.",
    ),
    Route("/openapi.json", "get", "This document", "application/json"),
    Route(
        "/metrics", "get", "Prometheus metrics, summed over every worker", "text/plain",
        errors=ALWAYS + KEYED, auth="admin", description="For admin keys (ADMIN_API_KEYS) only.",
    ),
]


def build_openapi(request_models: dict[str, type[BaseModel]], allowed_models: list[str] = ()) -> dict:
    """The document, from the request models create_app built (by name) and the response models."""
    schemas = component_schemas(list(request_models.values()))
    if allowed_models:
        describe_allowed_models(schemas, allowed_models)
    paths: dict = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "genapi",
            "version": "1",
            "description": "A generative-AI model behind POST /generate (streamed or not) and OpenAI's own "
            "contract at /v1, with an X-API-KEY (on /v1, or Authorization: Bearer). Every "
            "error has one shape, ErrorResponse; an unknown route is a 404 and a wrong method a 405, in that shape.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-KEY", "description": "A client key."},
                BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "A client key, on /v1 only."},
            },
            "headers": {
                "X-Request-ID": {
                    "description": "The request id: the client's X-Request-ID if it was plain, else a new one.",
                    "required": True,
                    "schema": {"type": "string"},
                },
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}},
            },
            "parameters": {
                "X-Request-ID": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Your id for this request, kept if plain: letters, digits and ._:- (1 to 128).",
                    "schema": {"type": "string"},
                }
            },
            "responses": {str(status): error_response(status) for status in ERROR_TYPES},
        },
    }


def component_schemas(request_models: list[type[BaseModel]]) -> dict:
    """Every model's JSON schema, each under its own name, with nested models referenced, not repeated."""
    answers = {route.answer for route in ROUTES if not isinstance(route.answer, str)} | {ErrorResponse}
    models = [(model, "validation") for model in request_models]
    models += [(model, "serialization") for model in sorted(answers, key=lambda model: model.__name__)]
    _, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return schema["$defs"]


def describe_allowed_models(schemas: dict, allowed_models: list[str]) -> None:
    """With ALLOWED_MODELS set, `model` says which models user keys may ask for.

    A description, not an enum: admin keys may use any model, so an enum would call their requests invalid.
    """
    for schema in schemas.values():
        field = schema.get("properties", {}).get("model")
        if field:
            field["description"] = (
                f"{field.get('description', '')} User keys may ask only for: {', '.join(allowed_models)} "
                "(ALLOWED_MODELS; others get 422 model_not_allowed, on /v1 404 model_not_found); admin keys may ask "
                "for any model."
            ).strip()


def operation(route: Route) -> dict:
    request_id = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if isinstance(route.answer, str):
        schema = {"type": "object"} if route.answer == "application/json" else {"type": "string"}
        content = {route.answer: {"schema": schema}}
    else:
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.answer.__name__}"}}}
    if route.events:
        # Before OpenAPI 3.2's itemSchema, the schema of an event stream describes each of its events.
        content["text/event-stream"] = {"schema": route.events}
    security = [{SECURITY_SCHEME: []}] + ([{BEARER_SCHEME: []}] if route.bearer else []) if route.auth else []
    spec = {
        "summary": route.summary,
        "operationId": route.method + route.path.replace("/", "_").replace(".", "_"),
        "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}],
        "responses": {"200": {"description": "Success.", "headers": request_id, "content": content}}
        | {str(status): {"$ref": f"#/components/responses/{status}"} for status in sorted(route.errors)},
        "security": security,
    }
    if route.description:
        spec["description"] = route.description
    if route.body:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
        }
    return spec


def error_response(status: int) -> dict:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if status in RETRY_AFTER_STATUSES:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return {
        "description": ERROR_MEANINGS[status],
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
