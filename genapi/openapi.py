"""The OpenAPI 3.1 document of GET /openapi.json, built from the pydantic models that validate and shape requests.

The schemas come from the models themselves (with the limits the settings gave them), so the document cannot
drift from what the service accepts and answers. Each route is one entry in ROUTES; a new route is one more entry
(and, if it reads a body, its request model passed to build_openapi by the name its entry gives).
"""

import re
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from genapi.admin import AuditList, CreatedKey, KeyDetail, KeyList, KeyView, RotatedKey
from genapi.errors import ERROR_TYPES
from genapi.schemas import BatchResponse, ErrorResponse, GenerateResponse, HealthResponse, ModelList, ReadyResponse
from genapi.usage import OwnUsage, UsageReport

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
    403: "The key is not accepted (invalid_api_key), has been revoked (key_revoked) or has expired (key_expired), "
    "or the route needs an admin key (admin_only).",
    404: "No such route (not_found); on /v1, a model this key may not use (model_not_found); or no key has this id "
    "(key_not_found).",
    405: "The route does not take this method (method_not_allowed); the Allow header lists those it takes.",
    409: "The key is set in API_KEYS or ADMIN_API_KEYS, so the API cannot change, rotate or revoke it "
    "(key_from_environment), or it is revoked, so it cannot be changed or rotated (key_revoked).",
    413: "The body is larger than MAX_CONTENT_LENGTH (body_too_large).",
    415: "The body is not sent as application/json (unsupported_media_type).",
    422: "A field is missing, of the wrong type, out of range or unknown (validation_error), or the model is not "
    "in ALLOWED_MODELS (model_not_allowed), or a batch has more prompts than the key's whole rate limit "
    "(over_rate_limit); error.fields lists each failing field.",
    429: "A rate limit refused the request: the key's RATE_LIMIT (rate_limit_exceeded), this address's failed "
    "authentications (too_many_auth_failures) or its invalid requests (too_many_invalid_requests); retry after the "
    "Retry-After header's seconds. Or the key's token budget cannot cover what the request may cost "
    "(budget_exceeded): the message says how much is left, Retry-After is the seconds to the budget's reset, and "
    "the X-Budget-* headers give its state.",
    500: "A bug in genapi (internal_error); it is logged.",
    502: "The model server failed, could not be reached, answered with something unusable, refused genapi's "
    "credentials, or says genapi's account is out of quota (upstream_error, upstream_unavailable, "
    "upstream_bad_response, upstream_auth, upstream_quota_exceeded).",
    503: "The model server is rate-limiting or overloaded (upstream_rate_limited); retry after Retry-After seconds. "
    "Redis is failing, so the key's token budget cannot be counted (budget_unavailable, type service_unavailable). "
    "On /readyz: Redis does not answer or refuses writes (redis_unavailable). A database key cannot be checked "
    "because the database is unreachable (key_store_unavailable); retry after Retry-After seconds. In a stream's "
    "error event only: the server is restarting and cut the stream short (server_shutting_down).",
    504: "The model server did not answer in time (upstream_timeout).",
}
RETRY_AFTER_STATUSES = (429, 503)

# The errors any route can give, and those of a route that reads a JSON body and calls the model.
ALWAYS = (500,)
KEYED = (401, 403, 429, 503)
JSON_BODY = (400, 413, 415, 422)
MODEL_CALL = (502, 503, 504)


ADMIN = ALWAYS + KEYED


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
    status: int = 200
    parameters: tuple[dict, ...] = ()  # path and query parameters
    body_required: bool = True
    csv: bool = False  # also answers text/csv, to Accept: text/csv


KEY_ID = {
    "name": "key_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 100},
    "description": "The key's id: the <id> of gk_<id>_<secret>, or env-<name> for a key from API_KEYS.",
}
DATE_RANGE = (
    {"name": "start", "in": "query", "required": False, "schema": {"type": "string", "format": "date"},
     "description": "First UTC day, YYYY-MM-DD; default 29 days before end."},
    {"name": "end", "in": "query", "required": False, "schema": {"type": "string", "format": "date"},
     "description": "Last UTC day, YYYY-MM-DD, included; default today, or 29 days after start. A start after "
     "the end is an empty range."},
)
GROUP_BY = {
    "name": "group_by", "in": "query", "required": False,
    "schema": {"type": "string", "pattern": "^(key|model|day)(,(key|model|day))*$", "default": "key,model,day"},
    "description": "What to group by: key, model and/or day, comma-separated.",
}
USAGE_KEY = {
    "name": "key_id", "in": "query", "required": False, "schema": {"type": "string"},
    "description": "Only this key's usage (env-<name> for a key of API_KEYS).",
}
AUDIT_QUERY = (
    {"name": "key_id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only this key's entries."},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^([1-9][0-9]{0,2}|1000)$", "default": "100"},
     "description": "Most entries to return, newest first: 1 to 1000."},
)


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
    Route(
        "/admin/keys", "post", "Create a key", CreatedKey, errors=ADMIN + JSON_BODY, body="KeyCreate",
        auth="admin", status=201,
        description="The answer holds the whole key under `key`, this once: only its secret's digest is stored.",
    ),
    Route(
        "/admin/keys", "get", "List every key", KeyList, errors=ADMIN, auth="admin",
        description="Database keys and those of API_KEYS and ADMIN_API_KEYS (source: environment); never a secret.",
    ),
    Route(
        "/admin/keys/{key_id}", "get", "Read one key, with its usage of the last seven days", KeyDetail,
        errors=ADMIN + (404,), auth="admin", parameters=(KEY_ID,),
    ),
    Route(
        "/admin/keys/{key_id}", "patch", "Change a key's name or limits", KeyView,
        errors=ADMIN + JSON_BODY + (404, 409), body="KeyUpdate", auth="admin", parameters=(KEY_ID,),
        description="Only the fields given change; null clears rate_limit, allowed_models, token_budget or expires_at.",
    ),
    Route(
        "/admin/keys/{key_id}", "delete", "Revoke a key", KeyView, errors=ADMIN + (404, 409), auth="admin",
        parameters=(KEY_ID,),
        description="Every worker of every instance refuses it within KEY_CACHE_SECONDS (key_revoked).",
    ),
    Route(
        "/admin/keys/{key_id}/rotate", "post", "Give a key a new secret", RotatedKey,
        errors=ADMIN + JSON_BODY + (404, 409), body="KeyRotate", body_required=False, auth="admin",
        parameters=(KEY_ID,),
        description="The new key is in the answer, once. The old secret stops at once, or after grace_seconds.",
    ),
    Route(
        "/v1/usage", "get", "The calling key's own usage by day and model", OwnUsage, errors=ALWAYS + KEYED + (422,),
        auth="key", parameters=DATE_RANGE,
        description="Requests and tokens of the rows written so far (within USAGE_FLUSH_SECONDS of each request).",
    ),
    Route(
        "/admin/usage", "get", "Every key's usage, grouped by key, model and/or day", UsageReport,
        errors=ADMIN + (404, 422), auth="admin", parameters=(*DATE_RANGE, GROUP_BY, USAGE_KEY), csv=True,
        description="JSON, or CSV with Accept: text/csv (one header line, then one line per group).",
    ),
    Route(
        "/admin/audit", "get", "Read the audit log of admin actions", AuditList, errors=ADMIN + (404, 422), auth="admin",
        parameters=AUDIT_QUERY, description="Newest first. Who, when, what, and the key before and after; never a secret.",
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
            "error has one shape, ErrorResponse; an unknown route is a 404 and a wrong method a 405, in that shape. "
            "The interactive docs page built on this document is at /docs.",
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
                "X-Budget-Limit": {
                    "description": "With a token budget (TOKEN_BUDGET): the key's tokens per period.",
                    "schema": {"type": "string"},
                },
                "X-Budget-Remaining": {
                    "description": "With a token budget: the tokens left after this request (while a stream runs, "
                    "after its reservation).",
                    "schema": {"type": "string"},
                },
                "X-Budget-Reset": {
                    "description": "With a token budget: when its period ends and it resets, as Unix time.",
                    "schema": {"type": "string"},
                },
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


BUDGET_HEADERS = {name: {"$ref": f"#/components/headers/{name}"}
                  for name in ("X-Budget-Limit", "X-Budget-Remaining", "X-Budget-Reset")}


def operation(route: Route) -> dict:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if MODEL_CALL[0] in route.errors:  # a route that calls the model answers with its key's budget
        headers |= BUDGET_HEADERS
    if isinstance(route.answer, str):
        schema = {"type": "object"} if route.answer == "application/json" else {"type": "string"}
        content = {route.answer: {"schema": schema}}
    else:
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.answer.__name__}"}}}
        if route.csv:
            content["text/csv"] = {"schema": {"type": "string"}}
    if route.events:
        # Before OpenAPI 3.2's itemSchema, the schema of an event stream describes each of its events.
        content["text/event-stream"] = {"schema": route.events}
    security = [{SECURITY_SCHEME: []}] + ([{BEARER_SCHEME: []}] if route.bearer else []) if route.auth else []
    spec = {
        "summary": route.summary,
        "operationId": route.method + re.sub(r"[/.{}]", "_", route.path),
        "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}, *route.parameters],
        "responses": {str(route.status): {"description": "Success.", "headers": headers, "content": content}}
        | {str(status): {"$ref": f"#/components/responses/{status}"} for status in sorted(route.errors)},
        "security": security,
    }
    if route.description:
        spec["description"] = route.description
    if route.body:
        spec["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
        }
    return spec


def error_response(status: int) -> dict:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if status in RETRY_AFTER_STATUSES:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    if status == 429:
        headers |= BUDGET_HEADERS
    return {
        "description": ERROR_MEANINGS[status],
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
