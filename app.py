"""genapi's web app: POST /generate behind an X-API-KEY, in front of an OpenAI-compatible model.

The path of a request: `generate()` below -> `authenticate()` (genapi.keys) -> `parse_body()` (genapi.schemas)
-> `provider.complete()` (genapi.providers) -> JSON. Every failure on the way is an ApiError, which
genapi.errors turns into the one error shape.
"""

import logging
import re
import uuid

import httpx2
from flask import Flask, current_app, g, jsonify, request

from config import Settings, load_settings, split_list
from genapi.errors import ApiError, register_error_handlers
from genapi.keys import Client, KeyRing
from genapi.providers import Generation, build_provider
from genapi.schemas import GenerateResponse, Usage, build_request_models, parse_body

log = logging.getLogger("genapi")

# A client's X-Request-ID is kept only if it is short and plain, so it cannot smuggle anything into our logs.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None, http_client: httpx2.Client | None = None) -> Flask:
    """Build the app from settings (read from the environment when not given); http_client is for tests."""
    settings = settings or load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx2 logs every upstream call at INFO: a second log line per request, which costs CPU and tells nothing that
    # the request's own log line does not. Its warnings still show, and everything at LOG_LEVEL=DEBUG.
    logging.getLogger("httpx2").setLevel("DEBUG" if settings.log_level == "DEBUG" else "WARNING")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False  # keep "response" first, as the contract lists it
    app.extensions["genapi"] = {
        "settings": settings,
        "keys": KeyRing(split_list(settings.api_keys.get_secret_value())),
        "provider": build_provider(settings, http_client),
        "GenerateRequest": build_request_models(settings.max_prompt_chars, settings.max_tokens_limit),
    }
    register_error_handlers(app)
    app.before_request(assign_request_id)
    app.after_request(send_request_id)
    app.add_url_rule("/generate", view_func=generate, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    return app


def state(name: str):
    """What create_app built for this app: settings, keys, provider, request models."""
    return current_app.extensions["genapi"][name]


def assign_request_id() -> None:
    client_id = request.headers.get("X-Request-ID", "")
    g.request_id = client_id if SANE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex


def send_request_id(response):
    response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
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


def generate():
    """POST /generate: one prompt in, the model's text out."""
    g.client = authenticate()
    generation = generation_from(read_json_body(state("GenerateRequest")))
    completion = state("provider").complete(generation)
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
    return jsonify(status="ok")


# gunicorn's `app:app` and `flask --app app` find the app here; tests build their own with create_app().
app = create_app()
