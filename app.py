"""genapi's web app: POST /generate (and /generate/batch) behind an X-API-KEY, in front of an OpenAI-compatible model.

The path of a request: `generate()` below -> `authenticate()` (genapi.auth) -> `parse_body()` (genapi.schemas)
-> `charge()` against the key's rate limit (genapi.limits) -> `answer()`: the cache (genapi.cache), else
`complete()` -> `provider.complete()` (genapi.providers) -> JSON. Every failure on the way is an ApiError, which
genapi.errors turns into the one error shape. Every answer then passes `finish_request()`, which counts it in the
metrics (genapi.metrics) and writes its one JSON log line (genapi.logs).

With "stream": true, `stream_answer()` hands the answer to a StreamRelay (genapi.streaming), which relays the
model's stream as server-sent events and, when the stream ends, counts it and writes its log line itself. The
OpenAI-compatible routes, /v1/chat/completions and /v1/models, are the blueprint in genapi.v1.
"""

import functools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import click
import httpx2
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings, load_settings, split_list
from genapi import metrics, v1
from genapi.auth import authenticate, require_admin
from genapi.cache import build_cache, cache_key
from genapi.commands import create_key
from genapi.errors import ApiError, register_error_handlers
from genapi.keys import Client, KeyRing
from genapi.limits import build_limiter, charge
from genapi.logs import configure_logging, log_request, stream_record
from genapi.openapi import build_openapi
from genapi.providers import Completion, Generation, build_provider, chat_body
from genapi.redis_state import RedisState
from genapi.schemas import HealthResponse, ReadyResponse, build_request_models, parse_body, read_body
from genapi.streaming import CachedStream, GenerateEvents, StreamLimits, StreamRelay, stream_response

log = logging.getLogger("genapi")

# A client's X-Request-ID is kept only if it is short and plain, so it cannot smuggle anything into our logs.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None, http_client: httpx2.Client | None = None) -> Flask:
    """Build the app from settings (read from the environment when not given); http_client is for tests."""
    settings = settings or load_settings(serving=will_serve())
    configure_logging(settings.log_level)

    app = Flask(__name__, static_folder=None)  # no static files: every route is in the OpenAPI document
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    # Flask's automatic OPTIONS answers are empty HTML pages; an OPTIONS request gets the JSON 405 with Allow instead.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # keep "response" first, as the contract lists it
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)
    redis_state = None
    if settings.redis_url:
        redis_state = RedisState(settings.redis_url.get_secret_value(), settings.redis_key_prefix)
    request_models = build_request_models(
        settings.max_prompt_chars, settings.max_tokens_limit, settings.batch_max_prompts
    )
    app.extensions["genapi"] = {
        "settings": settings,
        "keys": KeyRing(
            split_list(settings.api_keys.get_secret_value()), split_list(settings.admin_api_keys.get_secret_value())
        ),
        "provider": build_provider(settings, http_client),
        "redis": redis_state,
        "cache": build_cache(settings, redis_state),
        "openapi": build_openapi(request_models, settings.allowed_models),
    } | request_models
    register_error_handlers(app)
    app.before_request(start_request)
    app.after_request(finish_request)
    limiter = build_limiter(app, settings, redis_state)
    app.add_url_rule("/generate", view_func=generate, methods=["POST"])
    app.add_url_rule("/generate/batch", view_func=generate_batch, methods=["POST"])
    app.register_blueprint(v1.blueprint)
    app.add_url_rule("/healthz", view_func=limiter.exempt(healthz), methods=["GET"])
    app.add_url_rule("/readyz", view_func=limiter.exempt(readyz), methods=["GET"])
    app.add_url_rule("/openapi.json", view_func=limiter.exempt(openapi_document), methods=["GET"])
    app.add_url_rule("/metrics", view_func=require_admin(metrics_text), methods=["GET"])
    app.cli.add_command(create_key)
    if not settings.has_client_keys:
        log.warning("no client keys are set (API_KEYS, ADMIN_API_KEYS): every request needing a key is refused")
    if redis_state:
        log.info("rate limits and the cache are shared through Redis at %s", redis_state.url)
    return app


def will_serve() -> bool:
    """Whether this process serves requests: under gunicorn or `flask run`, not under `flask create-key` or `routes`.

    The first key is made with `flask create-key` before any is set; a server without one must refuse to start.
    """
    command = click.get_current_context(silent=True)
    return command is None or command.info_name == "run"


def state(name: str):
    """What create_app built for this app: settings, keys, provider, redis, cache, limiter, models, OpenAPI."""
    return current_app.extensions["genapi"][name]


def new_request_id() -> str:
    """32 random hex digits, as a uuid4's hex would be, for a fraction of its cost."""
    return os.urandom(16).hex()


def start_request() -> None:
    g.started = time.perf_counter()
    client_id = request.headers.get("X-Request-ID", "")
    g.request_id = client_id if SANE_REQUEST_ID.fullmatch(client_id) else new_request_id()
    g.cached = False  # answer() sets it when the cache answers


def finish_request(response: Response) -> Response:
    """Every answer, success or error: its X-Request-ID header, its metrics, its one log line.

    A stream's metrics and log line come from its StreamRelay when it ends, not here as it begins.
    """
    if "request_id" not in g:  # an error before start_request ran
        g.request_id = new_request_id()
    response.headers["X-Request-ID"] = g.request_id
    if "stream_relay" in g:
        return response
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else None
    metrics.count_request(route, request.method, response.status_code, seconds)
    log_request(response.status_code, seconds, state("settings").log_prompts)
    return response


def read_json_body(model):
    """The validated body: 415 unless it is declared JSON; 400, 413 and 422 come from reading and parsing it."""
    return parse_body(model, read_body())


def generation_from(options, prompt: str, client: Client) -> Generation:
    """Apply the settings' model default and ALLOWED_MODELS (which bind users, not admins) to validated options."""
    settings: Settings = state("settings")
    model = options.model or settings.openai_model
    if settings.allowed_models and model not in settings.allowed_models and not client.is_admin:
        message = f"model {model!r} is not allowed; allowed models: {', '.join(settings.allowed_models)}"
        raise ApiError(422, message, code="model_not_allowed", param="model", fields=[{"param": "model", "message": message}])
    return Generation(
        prompt=prompt,
        model=model,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        system=options.system,
    )


def wants_fresh_answer() -> bool:
    """`Cache-Control: no-cache` asks for a new upstream call (whose answer is then cached); read only with a cache."""
    return bool(state("cache")) and bool(request.cache_control.no_cache)


def complete(generation: Generation) -> Completion:
    """The provider's completion, counted in the metrics and kept for the request's log line."""
    try:
        completion = state("provider").complete(generation)
    except ApiError as error:
        metrics.count_upstream_error(error.code)
        raise
    metrics.count_completion(completion.prompt_tokens, completion.completion_tokens, completion.upstream_ms)
    g.completion = completion
    return completion


def answer(client: Client, generation: Generation, answer_id: str, fresh: bool) -> dict:
    """One prompt's success body: from the cache when it holds one, else from the provider, then cached."""
    # What was asked and answered, for the request's log line with LOG_PROMPTS=true; the output once there is one.
    g.exchange = {"prompt": generation.prompt, "system": generation.system, "output": None}
    cache = state("cache")
    key = cache_key(client.name, generation) if cache else None
    stored = cache.get(key) if cache and not fresh else None
    cached = stored is not None
    if cache and not fresh:
        metrics.count_cache_lookup(cached)
    if cached:
        g.cached = True
    else:
        completion = complete(generation)
        stored = {
            "response": completion.text,
            "model": completion.model,
            "finish_reason": completion.finish_reason,
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }
        if cache:
            cache.put(key, stored)
    g.exchange["output"] = stored["response"]
    # GenerateResponse's fields, in its order; built as a dict because every value is already checked, and the
    # model's own construction would cost a few per cent of a request's CPU (tests check the shape against it).
    return stored | {"id": answer_id, "cached": cached}


def generate():
    """POST /generate: one prompt in, the model's text out."""
    client = authenticate()
    body = read_json_body(state("GenerateRequest"))
    generation = generation_from(body, body.prompt, client)
    charge(1)
    if body.stream:
        return stream_answer(client, generation, wants_fresh_answer())
    result = answer(client, generation, g.request_id, wants_fresh_answer())
    response = jsonify(result)
    if state("cache"):
        response.headers["X-Cache"] = "HIT" if result["cached"] else "MISS"
    return response


def stream_answer(client: Client, generation: Generation, fresh: bool) -> Response:
    """/generate's answer as a stream: from the cache when it holds one, else relayed from the provider, then cached."""
    settings: Settings = state("settings")
    g.exchange = {"prompt": generation.prompt, "system": generation.system, "output": None}
    cache = state("cache")
    key = cache_key(client.name, generation) if cache else None
    stored = cache.get(key) if cache and not fresh else None
    if cache and not fresh:
        metrics.count_cache_lookup(stored is not None)
    if stored is not None:
        g.cached = True
        open_upstream = functools.partial(CachedStream, stored)
    else:
        body = chat_body(generation) | {"stream": True, "stream_options": {"include_usage": True}}
        open_upstream = functools.partial(state("provider").open_stream, body)
    relay = StreamRelay(
        open_upstream,
        GenerateEvents(g.request_id, cached=stored is not None),
        StreamLimits.from_settings(settings),
        stream_record(settings.log_prompts),
        prompt_chars=len(generation.prompt) + len(generation.system or ""),
        model=generation.model,
        on_complete=functools.partial(cache.put, key) if cache and stored is None else None,
    )
    response = stream_response(relay)
    if cache:
        response.headers["X-Cache"] = "HIT" if stored is not None else "MISS"
    return response


def generate_batch():
    """POST /generate/batch: many prompts with the same options, answered concurrently, in order."""
    client = authenticate()
    body = read_json_body(state("BatchRequest"))
    generations = [generation_from(body, prompt, client) for prompt in body.prompts]
    charge(len(generations))  # each prompt is one request against the key's limit: all of the batch, or 429
    app, request_id, fresh = current_app._get_current_object(), g.request_id, wants_fresh_answer()

    def answer_or_error(position: int, generation: Generation) -> tuple[dict, Completion | None]:
        # Each prompt runs in a worker thread (a greenlet under gevent), outside the request, in its own app context.
        with app.app_context():
            try:
                return answer(client, generation, f"{request_id}-{position}", fresh), g.get("completion")
            except ApiError as error:
                return error.body(), None

    workers = min(state("settings").batch_concurrency, len(generations))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(answer_or_error, range(len(generations)), generations))
    results = [result for result, _ in outcomes]
    # The request's log line counts the whole batch: its tokens, its slowest upstream call, all cached or not.
    g.completion = combined([completion for _, completion in outcomes if completion])
    g.cached = all(result.get("cached") for result in results)
    g.exchange = {"prompt": body.prompts, "system": body.system, "output": [result.get("response") for result in results]}
    return jsonify(results=results)


def combined(completions: list[Completion]) -> Completion | None:
    """One batch's completions as one, for its log line: tokens summed, the longest upstream time."""
    if not completions:
        return None
    return Completion(
        text="",
        model=completions[0].model,
        finish_reason=None,
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        completion_tokens=sum(c.completion_tokens for c in completions),
        upstream_ms=max(c.upstream_ms for c in completions),
    )


def healthz():
    """GET /healthz: the process is up. No key, no upstream call."""
    return jsonify(HealthResponse(status="ok").model_dump())


def readyz():
    """GET /readyz: ready to serve, with Redis (when configured) answering. No key, no upstream call."""
    redis_state = state("redis")
    problem = redis_state.problem() if redis_state else None
    if problem:
        raise ApiError(503, f"Not ready: {problem}.", code="redis_unavailable", error_type="service_unavailable")
    return jsonify(ReadyResponse(status="ready").model_dump())


def openapi_document():
    """GET /openapi.json: the OpenAPI 3.1 document, built once by create_app. No key."""
    return jsonify(state("openapi"))


def metrics_text():
    """GET /metrics: Prometheus text, summed over every worker; admin keys only (require_admin)."""
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


# gunicorn's `app:app` and `flask --app app` find the app here; tests build their own with create_app().
app = create_app()
