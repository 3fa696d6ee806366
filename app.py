"""genapi's web app: POST /generate (and /generate/batch) behind an X-API-KEY, in front of an OpenAI-compatible model.

The path of a request: `generate()` below -> `authenticate()` (genapi.auth) -> `parse_body()` (genapi.schemas)
-> `charge()` against the key's rate limit (genapi.limits) -> `answer()`: the cache (genapi.cache), else
`complete()` -> `provider.complete()` (genapi.providers) -> JSON. Every failure on the way is an ApiError, which
genapi.errors turns into the one error shape. Every answer then passes `finish_request()`, which counts it in the
metrics (genapi.metrics), writes its one JSON log line (genapi.logs) and, if it reached the model or the cache,
gives the usage ledger its row (genapi.usage).

With "stream": true, `stream_answer()` hands the answer to a StreamRelay (genapi.streaming), which relays the
model's stream as server-sent events and, when the stream ends, counts it, writes its log line and gives the
ledger its row itself. The OpenAI-compatible routes, /v1/chat/completions and /v1/models, are the blueprint in
genapi.v1; keys made at run time, the audit log and usage reports are the admin API's (genapi.admin) and
/v1/usage's (genapi.usage).
"""

import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import click
import httpx2
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from config import UPSTREAM_BUDGET_SECONDS, Settings, load_settings, split_list
from genapi import metrics, v1
from genapi.admin import ADMIN_REQUEST_MODELS, admin
from genapi.auth import authenticate, require_admin
from genapi.budgets import bind_budgets, prompt_tokens_estimate, release, reserve, settle, show_budget
from genapi.cache import build_cache, cache_key
from genapi.commands import create_key, database_commands, key_commands
from genapi.cors import bind_cors
from genapi.database import Database, database_url, prepare
from genapi.docs_page import register_docs_page
from genapi.errors import ApiError, register_error_handlers
from genapi.keys import Client, DatabaseKeys, KeyRing
from genapi.limits import build_limits, charge, exempt
from genapi.logs import configure_logging, log_request, sane_request_id, stream_record
from genapi.openapi import build_openapi
from genapi.providers import Completion, Generation, build_provider, chat_body
from genapi.redis_state import RedisState
from genapi.schemas import HealthResponse, ReadyResponse, build_request_models, parse_body, read_body
from genapi.streaming import CachedStream, GenerateEvents, StreamLimits, StreamRelay, stream_response
from genapi.usage import Ledger, record_request, stream_usage_recorder, usage_api

log = logging.getLogger("genapi")


def create_app(settings: Settings | None = None, http_client: httpx2.Client | None = None) -> Flask:
    """Build the app from settings (read from the environment when not given); http_client is for tests."""
    serving = will_serve()
    settings = settings or load_settings(serving=serving)
    # A command such as `flask create-key` prints its result on stdout: its log lines go to stderr.
    configure_logging(settings.log_level, to_stderr=not serving)

    app = Flask(__name__, static_folder=None)  # no static files: every route is in the OpenAPI document
    database = Database(database_url(settings, app.instance_path))
    if serving:
        prepare(database)  # a schema that is behind stops start-up here, naming the command that brings it up
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
        "database": database,
        "ledger": Ledger(database, settings.usage_flush_seconds, settings.usage_buffer_rows),
        "keys": KeyRing(
            split_list(settings.api_keys.get_secret_value()),
            split_list(settings.admin_api_keys.get_secret_value()),
            DatabaseKeys(database.engine, settings.key_cache_seconds),
        ),
        "provider": build_provider(settings, http_client),
        "redis": redis_state,
        "cache": build_cache(settings, redis_state),
        "openapi": build_openapi(request_models | ADMIN_REQUEST_MODELS, settings.allowed_models),
    } | request_models
    register_error_handlers(app)
    app.before_request(start_request)
    app.after_request(finish_request)
    build_limits(app, settings, redis_state)
    bind_budgets(app, settings, redis_state)
    bind_cors(app, settings.cors_origins)
    app.add_url_rule("/generate", view_func=generate, methods=["POST"])
    app.add_url_rule("/generate/batch", view_func=generate_batch, methods=["POST"])
    app.register_blueprint(v1.blueprint)
    app.add_url_rule("/healthz", view_func=exempt(healthz), methods=["GET"])
    app.add_url_rule("/readyz", view_func=exempt(readyz), methods=["GET"])
    app.add_url_rule("/openapi.json", view_func=exempt(openapi_document), methods=["GET"])
    app.add_url_rule("/metrics", view_func=require_admin(metrics_text), methods=["GET"])
    register_docs_page(app)
    app.register_blueprint(admin)
    app.register_blueprint(usage_api)
    app.cli.add_command(create_key)
    app.cli.add_command(database_commands)
    app.cli.add_command(key_commands)
    if redis_state:
        log.info("rate limits and the cache are shared through Redis at %s", redis_state.url)
    return app


def will_serve() -> bool:
    """Whether this process serves requests: under gunicorn or `flask run`, not under `flask create-key` or `routes`.

    The first key is made with `flask create-key` before any is set; a server without one must refuse to start.
    A command such as `flask db upgrade` must start on a database whose schema is behind, to bring it up.
    """
    command = click.get_current_context(silent=True)
    return command is None or command.info_name == "run"


def state(name: str):
    """What create_app built for this app: settings, keys, provider, redis, cache, limits, models, OpenAPI."""
    return current_app.extensions["genapi"][name]


def new_request_id() -> str:
    """32 random hex digits, as a uuid4's hex would be, for a fraction of its cost."""
    return os.urandom(16).hex()


def start_request() -> None:
    g.started = time.perf_counter()
    g.request_id = sane_request_id(request.headers.get("X-Request-ID")) or new_request_id()
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
    record_request(response.status_code, seconds)
    return response


def read_json_body(model):
    """The validated body: 415 unless it is declared JSON; 400, 413 and 422 come from reading and parsing it."""
    return parse_body(model, read_body())


def generation_from(options, prompt: str, client: Client) -> Generation:
    """Apply the settings' model default and the models the key may use to validated options."""
    settings: Settings = state("settings")
    model = options.model or settings.openai_model
    allowed = client.bound_models(settings.allowed_models)
    if allowed and model not in allowed:
        message = f"model {model!r} is not allowed; allowed models: {', '.join(allowed)}"
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


def complete(generation: Generation, deadline: float | None = None) -> Completion:
    """The provider's completion, counted in the metrics and kept for the request's log line."""
    try:
        completion = state("provider").complete(generation, deadline)
    except ApiError as error:
        metrics.count_upstream_error(error.code)
        raise
    metrics.count_completion(completion.prompt_tokens, completion.completion_tokens, completion.upstream_ms)
    g.completion = completion
    return completion


def most_tokens(generation: Generation) -> int:
    """The most one generation can cost, what its token budget reserves: the prompt's estimate plus max_tokens."""
    characters = len(generation.prompt) + len(generation.system or "")
    return prompt_tokens_estimate(characters, messages=2 if generation.system else 1) + generation.max_tokens


def budgeted_completion(generation: Generation, deadline: float | None = None) -> Completion:
    """complete() inside the key's token budget: reserved before the call, settled to its usage, released on failure."""
    reservation = reserve(most_tokens(generation))
    try:
        completion = complete(generation, deadline)
    except BaseException:
        release(reservation)
        raise
    settle(reservation, completion.prompt_tokens + completion.completion_tokens)
    return completion


def answer(client: Client, generation: Generation, answer_id: str, fresh: bool, deadline: float | None = None,
           budgeted: bool = True) -> dict:
    """One prompt's success body: from the cache when it holds one (at no cost to the budget), else from the provider.

    `deadline` (time.monotonic()) is when the whole request must be over: a batch's prompts share it, and their
    budget, which the batch reserves for all of them (`budgeted=False` here).
    """
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
        if budgeted:
            show_budget()
    else:
        completion = budgeted_completion(generation, deadline) if budgeted else complete(generation, deadline)
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
    g.usage_model = generation.model  # from here on the request reaches the model or the cache: it has a usage row
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
    reservation = None
    if stored is not None:
        g.cached = True
        show_budget()
        open_upstream = functools.partial(CachedStream, stored)
    else:
        body = chat_body(generation) | {"stream": True, "stream_options": {"include_usage": True}}
        open_upstream = functools.partial(state("provider").open_stream, body)
        reservation = reserve(most_tokens(generation))
    relay = StreamRelay(
        open_upstream,
        GenerateEvents(g.request_id, cached=stored is not None),
        StreamLimits.from_settings(settings),
        stream_record(settings.log_prompts),
        prompt_chars=len(generation.prompt) + len(generation.system or ""),
        model=generation.model,
        on_complete=functools.partial(cache.put, key) if cache and stored is None else None,
        record_usage=stream_usage_recorder(),
        reservation=reservation,
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
    g.usage_model = generations[0].model
    app, request_id, fresh = current_app._get_current_object(), g.request_id, wants_fresh_answer()
    # However many rounds of BATCH_CONCURRENCY the prompts take, the request ends inside the budget that start-up
    # checks one call against: the last prompts get what is left of it, or a 504 when nothing is.
    deadline = time.monotonic() + UPSTREAM_BUDGET_SECONDS

    def answer_or_error(position: int, generation: Generation) -> tuple[dict, Completion | None]:
        # Each prompt runs in a worker thread (a greenlet under gevent), outside the request, in its own app context.
        with app.app_context():
            try:
                result = answer(client, generation, f"{request_id}-{position}", fresh, deadline, budgeted=False)
                return result, g.get("completion")
            except ApiError as error:
                return error.body(), None

    # The whole batch is reserved at once, all of it or a 429, like its rate limit; it settles once, at its end,
    # to the usage of the prompts the model answered (cache hits and failures cost nothing).
    reservation = reserve(sum(most_tokens(generation) for generation in generations))
    workers = min(state("settings").batch_concurrency, len(generations))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = list(pool.map(answer_or_error, range(len(generations)), generations))
    except BaseException:
        release(reservation)
        raise
    results = [result for result, _ in outcomes]
    # The request's log line counts the whole batch: its tokens, its slowest upstream call, all cached or not.
    g.completion = combined([completion for _, completion in outcomes if completion])
    settle(reservation, g.completion.prompt_tokens + g.completion.completion_tokens if g.completion else 0)
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
        budgets = state("budgets").readiness()
        raise ApiError(503, f"Not ready: {problem}{budgets}.", code="redis_unavailable", error_type="service_unavailable")
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
