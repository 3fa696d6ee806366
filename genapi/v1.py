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
from genapi.budgets import prompt_tokens_estimate, release, reserve, settle, show_budget
from genapi.errors import ApiError
from genapi.limits import charge
from genapi.logs import stream_record
from genapi.providers import Completion, message_text
from genapi.schemas import parse_body, read_body
from genapi.streaming import ChatChunks, StreamLimits, StreamRelay, stream_response
from genapi.upstream_values import model_name, token_count, upstream_id
from genapi.usage import stream_usage_recorder

blueprint = Blueprint("v1", __name__, url_prefix="/v1")


def state(name: str):
    return current_app.extensions["genapi"][name]


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"Invalid request: {param}: {message}", code="validation_error", param=param,
                    fields=[{"param": param, "message": message}])


def listed_models(client) -> list[str]:
    """The models GET /v1/models names: those the key may ask for, or without a list the ones ALLOWED_MODELS names,
    or the default model."""
    settings: Settings = state("settings")
    return list(client.bound_models(settings.allowed_models) or settings.allowed_models or [settings.openai_model])


def read_chat_request(client) -> dict:
    """The body as the upstream will get it: checked where genapi is responsible, with the model and a token cap."""
    settings: Settings = state("settings")
    raw = read_body()
    checked = parse_body(state("ChatCompletionRequest"), raw)  # 400 or 422 for what genapi checks
    body = json.loads(raw)  # the body goes on as sent, but for the token caps it read
    for cap in ("max_tokens", "max_completion_tokens"):
        if body.get(cap) is not None:  # 10.0 is the integer 10 (JSON Schema's count), sent on as 10
            body[cap] = getattr(checked, cap)
    messages = body["messages"]
    characters = sum(len(message_text(message.get("content"))) for message in messages)
    if characters > settings.max_prompt_chars:
        raise invalid("messages", f"hold {characters} characters of text, more than {settings.max_prompt_chars}")
    model = body.get("model") or settings.openai_model
    body["model"] = model
    allowed = client.bound_models(settings.allowed_models)
    if allowed and model not in allowed:
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
    g.usage_model = body["model"]  # from here on the request reaches the model or the cache: it has a usage row
    if body.get("stream"):
        return stream_chat(body)
    return complete_chat(client, body)


def most_tokens(body: dict) -> int:
    """The most a chat request can cost, what its token budget reserves: the messages' estimate plus its token cap."""
    messages = body["messages"]
    characters = sum(len(message_text(message.get("content"))) for message in messages)
    # With both caps sent, which one a model server honours is its own choice: reserve for the larger.
    cap = max(body.get("max_completion_tokens") or 0, body.get("max_tokens") or 0) or state("settings").max_tokens_limit
    return prompt_tokens_estimate(characters, messages=len(messages)) + cap


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
        show_budget()
        response = jsonify(stored)
    else:
        reservation = reserve(most_tokens(body))
        started = time.perf_counter()
        try:
            raw, answer = state("provider").chat(body)
            g.completion = chat_completion_of(answer, body["model"], started)
        except ApiError as error:
            release(reservation)
            metrics.count_upstream_error(error.code)
            raise
        except BaseException:
            release(reservation)
            raise
        if isinstance(answer.get("model"), str) and answer["model"] != g.completion.model:  # a path: its file's name
            answer["model"] = g.completion.model
            raw = json.dumps(answer).encode()
        metrics.count_completion(g.completion.prompt_tokens, g.completion.completion_tokens, g.completion.upstream_ms)
        settle(reservation, g.completion.prompt_tokens + g.completion.completion_tokens)
        if cache:
            cache.put(key, answer)
        response = Response(raw, mimetype="application/json")
    if cache:
        response.headers["X-Cache"] = "HIT" if stored is not None else "MISS"
    return response


def chat_completion_of(answer: dict, requested_model: str, started: float) -> Completion:
    """What a /v1 answer used, for the log line, the metrics, the ledger and the budget; its values bounded."""
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    return Completion(
        text="",
        model=model_name(answer.get("model"), requested_model),
        finish_reason=None,
        prompt_tokens=token_count(usage.get("prompt_tokens")),
        completion_tokens=token_count(usage.get("completion_tokens")),
        upstream_request_id=upstream_id(None, answer.get("id")),
        upstream_ms=(time.perf_counter() - started) * 1000,
    )


def stream_chat(body: dict) -> Response:
    """The model server's stream, relayed line by line; its usage chunk only if the client asked for it."""
    settings: Settings = state("settings")
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    characters = sum(len(message_text(message.get("content"))) for message in body["messages"])
    reservation = reserve(most_tokens(body))
    relay = StreamRelay(
        functools.partial(state("provider").open_stream, body),
        ChatChunks(include_usage),
        StreamLimits.from_settings(settings),
        stream_record(settings.log_prompts),
        prompt_chars=characters,
        model=body["model"],
        record_usage=stream_usage_recorder(),
        reservation=reservation,
    )
    return stream_response(relay)


@blueprint.get("/models")
def list_models():
    """GET /v1/models: the models this key may ask for, in OpenAI's shape."""
    models = listed_models(authenticate(bearer=True))
    return jsonify(object="list", data=[{"id": model, "object": "model", "created": 0, "owned_by": "genapi"}
                                        for model in models])
