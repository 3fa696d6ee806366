"""genapi's web app: POST /generate behind an X-API-KEY, in front of an OpenAI-compatible model.

The path of a request: `generate()` below -> `authenticate()` (genapi.keys) -> `parse_body()` (genapi.schemas)
-> `complete()` -> `provider.complete()` (genapi.providers) -> JSON. Every failure on the way is an ApiError, which
genapi.errors turns into the one error shape. Every answer then passes `finish_request()`, which counts it in the
metrics (genapi.metrics) and writes its one JSON log line (genapi.logs).
"""

import re
import time
import uuid

import httpx2
from flask import Flask, Response, current_app, g, jsonify, request

from config import Settings, load_settings, split_list
from genapi import metrics
from genapi.errors import ApiError, register_error_handlers
from genapi.keys import Client, KeyRing
from genapi.logs import configure_logging, log_request
from genapi.openapi import build_openapi
from genapi.providers import Completion, Generation, build_provider
from genapi.schemas import GenerateResponse, HealthResponse, Usage, build_request_models, parse_body

# A client's X-Request-ID is kept only if it is short and plain, so it cannot smuggle anything into our logs.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None, http_client: httpx2.Client | None = None) -> Flask:
    """Build the app from settings (read from the environment when not given); http_client is for tests."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False  # keep "response" first, as the contract lists it
    generate_request = build_request_models(settings.max_prompt_chars, settings.max_tokens_limit)
    app.extensions["genapi"] = {
        "settings": settings,
        "keys": KeyRing(
            split_list(settings.api_keys.get_secret_value()), split_list(settings.admin_api_keys.get_secret_value())
        ),
        "provider": build_provider(settings, http_client),
        "GenerateRequest": generate_request,
        "openapi": build_openapi({"GenerateRequest": generate_request}, settings.allowed_models),
    }
    register_error_handlers(app)
    app.before_request(start_request)
    app.after_request(finish_request)
    app.add_url_rule("/generate", view_func=generate, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    app.add_url_rule("/openapi.json", view_func=openapi_document, methods=["GET"])
    app.add_url_rule("/metrics", view_func=metrics_text, methods=["GET"])
    return app


def state(name: str):
    """What create_app built for this app: settings, keys, provider, request models, OpenAPI document."""
    return current_app.extensions["genapi"][name]


def start_request() -> None:
    g.started = time.perf_counter()
    client_id = request.headers.get("X-Request-ID", "")
    g.request_id = client_id if SANE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
    g.cached = False  # the response cache sets it when it answers


def finish_request(response: Response) -> Response:
    """Every answer, success or error: its X-Request-ID header, its metrics, its one log line."""
    g.setdefault("request_id", uuid.uuid4().hex)
    response.headers["X-Request-ID"] = g.request_id
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else None
    metrics.count_request(route, request.method, response.status_code, seconds)
    log_request(response.status_code, seconds, state("settings").log_prompts)
    return response


def authenticate() -> Client:
    """The client behind the X-API-KEY header: 401 without one, 403 for a key that is not accepted."""
    presented = request.headers.get("X-API-KEY")
    if not presented:
        raise ApiError(401, "Send your key in the X-API-KEY header.", code="missing_api_key")
    client = state("keys").identify(presented)
    if client is None:
        raise ApiError(403, "The X-API-KEY is not accepted.", code="invalid_api_key")
    return client


def require_admin(client: Client) -> None:
    """403 unless the client's key is one of ADMIN_API_KEYS."""
    if not client.is_admin:
        raise ApiError(403, "This route needs an admin key (ADMIN_API_KEYS).", code="admin_only")


def read_json_body(model):
    """The validated body: 415 unless it is declared JSON; 400, 413 and 422 come from reading and parsing it."""
    if not request.is_json:
        raise ApiError(415, "The body must be JSON, sent with Content-Type: application/json.", code="unsupported_media_type")
    return parse_body(model, request.get_data(cache=False))


def generation_from(body) -> Generation:
    """Apply the settings' model default and ALLOWED_MODELS to a validated body."""
    settings: Settings = state("settings")
    model = body.model or settings.openai_model
    if settings.allowed_models and model not in settings.allowed_models:
        message = f"model {model!r} is not allowed; allowed models: {', '.join(settings.allowed_models)}"
        raise ApiError(422, message, code="model_not_allowed", param="model", fields=[{"param": "model", "message": message}])
    return Generation(
        prompt=body.prompt, model=model, max_tokens=body.max_tokens, temperature=body.temperature, system=body.system
    )


def complete(generation: Generation) -> Completion:
    """The provider's completion, counted in the metrics and kept for the request's log line."""
    g.generation = generation
    try:
        completion = state("provider").complete(generation)
    except ApiError as error:
        metrics.count_upstream_error(error.code)
        raise
    metrics.count_completion(completion.prompt_tokens, completion.completion_tokens, completion.upstream_ms)
    g.completion = completion
    return completion


def generate():
    """POST /generate: one prompt in, the model's text out."""
    g.client = authenticate()
    generation = generation_from(read_json_body(state("GenerateRequest")))
    completion = complete(generation)
    answer = GenerateResponse(
        response=completion.text,
        model=completion.model,
        finish_reason=completion.finish_reason,
        usage=Usage(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        ),
        id=g.request_id,
    )
    return jsonify(answer.model_dump())


def healthz():
    """GET /healthz: the process is up. No key, no upstream call."""
    return jsonify(HealthResponse(status="ok").model_dump())


def openapi_document():
    """GET /openapi.json: the OpenAPI 3.1 document, built once by create_app. No key."""
    return jsonify(state("openapi"))


def metrics_text():
    """GET /metrics: Prometheus text, for admin keys only."""
    g.client = authenticate()
    require_admin(g.client)
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


# gunicorn's `app:app` and `flask --app app` find the app here; tests build their own with create_app().
app = create_app()
