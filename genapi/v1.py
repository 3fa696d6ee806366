"""OpenAI's Chat Completions contract at /v1, so that OpenAI's own clients use genapi with `base_url=<genapi>/v1`.

genapi checks here only what it is responsible for: the key (X-API-KEY or Authorization: Bearer), the model against
ALLOWED_MODELS, max_tokens and max_completion_tokens against MAX_TOKENS_LIMIT, the size of the messages, and `n`.
Every other field goes to the model server as the client sent it, and its answer comes back as it sent it.
"""

import functools
import hashlib
import json
import time

from flask import Blueprint, Response, current_app, g, jsonify, request

from config import Settings
from genapi import metrics
from genapi.auth import authenticate
from genapi.errors import ApiError
from genapi.limits import charge
from genapi.logs import stream_record
from genapi.providers import Completion, message_text, token_count
from genapi.schemas import parse_body, read_body
from genapi.streaming import ChatChunks, StreamLimits, StreamRelay, stream_response

blueprint = Blueprint("v1", __name__, url_prefix="/v1")


def state(name: str):
    return current_app.extensions["genapi"][name]


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"Invalid request: {param}: {message}", code="validation_error", param=param,
                    fields=[{"param": param, "message": message}])


def allowed_models() -> list[str]:
    """The models a key may ask for: ALLOWED_MODELS, or without it the default model."""
    settings: Settings = state("settings")
    return settings.allowed_models or [settings.openai_model]


def read_chat_request(client) -> dict:
    """The body as the upstream will get it: checked where genapi is responsible, with the model and a token cap."""
    settings: Settings = state("settings")
    raw = read_body()
    parse_body(state("ChatCompletionRequest"), raw)  # 400 or 422 for what genapi checks; the body goes on as sent
    body = json.loads(raw)
    messages = body["messages"]
    characters = sum(len(message_text(message.get("content"))) for message in messages)
    if characters > settings.max_prompt_chars:
        raise invalid("messages", f"hold {characters} characters of text, more than {settings.max_prompt_chars}")
    model = body.get("model") or settings.openai_model
    body["model"] = model
    if settings.allowed_models and model not in settings.allowed_models and not client.is_admin:
        raise ApiError(404, f"The model {model!r} does not exist or this key may not use it.", code="model_not_found",
                       param="model", error_type="invalid_request_error")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = settings.max_tokens_limit
    g.exchange = {"prompt": messages, "system": None, "output": None}
    return body


@blueprint.post("/chat/completions")
def chat_completions():
    """POST /v1/chat/completions: OpenAI's Chat Completions, streamed or not."""
    client = authenticate(bearer=True)
    body = read_chat_request(client)
    charge(1)
    if body.get("stream"):
        return stream_chat(body)
    return complete_chat(client, body)


def complete_chat(client, body: dict) -> Response:
    """The model server's answer as it sent it; cached (with CACHE_TTL) by the whole body and the client."""
    cache = state("cache")
    key = hashlib.sha256(json.dumps([client.name, body], sort_keys=True).encode()).hexdigest() if cache else None
    fresh = bool(cache) and bool(request.cache_control.no_cache)  # as on /generate: ask again, then cache
    stored = cache.get(key) if cache and not fresh else None
    if cache and not fresh:
        metrics.count_cache_lookup(stored is not None)
    if stored is not None:
        g.cached = True
        response = jsonify(stored)
    else:
        started = time.perf_counter()
        try:
            raw, answer = state("provider").chat(body)
        except ApiError as error:
            metrics.count_upstream_error(error.code)
            raise
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        g.completion = Completion(
            text="",
            model=str(answer.get("model")),
            finish_reason=None,
            prompt_tokens=token_count(usage.get("prompt_tokens")),
            completion_tokens=token_count(usage.get("completion_tokens")),
            upstream_ms=(time.perf_counter() - started) * 1000,
        )
        metrics.count_completion(g.completion.prompt_tokens, g.completion.completion_tokens, g.completion.upstream_ms)
        if cache:
            cache.put(key, answer)
        response = Response(raw, mimetype="application/json")
    if cache:
        response.headers["X-Cache"] = "HIT" if stored is not None else "MISS"
    return response


def stream_chat(body: dict) -> Response:
    """The model server's stream, relayed line by line; its usage chunk only if the client asked for it."""
    settings: Settings = state("settings")
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    characters = sum(len(message_text(message.get("content"))) for message in body["messages"])
    relay = StreamRelay(
        functools.partial(state("provider").open_stream, body),
        ChatChunks(include_usage),
        StreamLimits.from_settings(settings),
        stream_record(settings.log_prompts),
        prompt_chars=characters,
        model=body["model"],
    )
    return stream_response(relay)


@blueprint.get("/models")
def list_models():
    """GET /v1/models: the models this key may ask for, in OpenAI's shape."""
    authenticate(bearer=True)
    models = allowed_models()
    return jsonify(object="list", data=[{"id": model, "object": "model", "created": 0, "owned_by": "genapi"}
                                        for model in models])
