"""The model behind /generate: OpenAI (or any OpenAI-compatible server) through the SDK, or the offline mock.

Both take the same Generation and return the same Completion; every upstream failure leaves here as an ApiError
with the status the contract gives it, so the route never sees an SDK exception.
"""

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import httpx2
import openai

from config import Settings
from genapi.errors import ApiError
from genapi.streaming import HttpStream
from genapi.upstream_http import upstream_http_client

log = logging.getLogger("genapi")


@dataclass(frozen=True)
class Generation:
    """One validated request for text."""

    prompt: str
    model: str
    max_tokens: int
    temperature: float | None = None
    system: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    upstream_request_id: str | None = None
    upstream_ms: float = 0.0


class MockProvider:
    """Answers offline and deterministically from the prompt, and says "model": "mock" so nobody mistakes it.

    It streams too, word by word, in the model server's own chunk format, so that one relay serves both providers.
    """

    def __init__(self, word_delay: float = 0.0):
        self.word_delay = word_delay

    @staticmethod
    def _words(prompt: str) -> list[str]:
        seed = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        return f"Mock answer {seed}: this is genapi's offline mock provider, not a model. You said: {prompt}".split()

    def complete(self, generation: Generation) -> Completion:
        words = self._words(generation.prompt)
        text = " ".join(words[: generation.max_tokens])
        prompt_tokens = len(generation.prompt.split()) + len((generation.system or "").split())
        return Completion(
            text=text,
            model="mock",
            finish_reason="length" if len(words) > generation.max_tokens else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=min(len(words), generation.max_tokens),
        )

    def _chat_completion(self, body: dict) -> Completion:
        messages = body["messages"]
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        generation = Generation(
            prompt=message_text(last.get("content")) or "",
            model="mock",
            max_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 50,
        )
        completion = self.complete(generation)
        prompt_tokens = sum(len(message_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
        return Completion(completion.text, "mock", completion.finish_reason, prompt_tokens, completion.completion_tokens)

    def chat(self, body: dict) -> tuple[bytes, dict]:
        """A Chat Completions answer in OpenAI's shape, as its JSON text and its parsed form."""
        completion = self._chat_completion(body)
        answer = {
            "id": f"chatcmpl-mock-{os.urandom(6).hex()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": usage_of(completion),
        }
        return json.dumps(answer).encode(), answer

    def open_stream(self, body: dict) -> "MockStream":
        return MockStream(self._chat_completion(body), self.word_delay)


class MockStream:
    """The mock's answer as the model server's stream chunks, a word at a time, `word_delay` seconds apart."""

    upstream_request_id = None

    def __init__(self, completion: Completion, word_delay: float):
        self._completion = completion
        self._word_delay = word_delay
        self._aborted = threading.Event()

    def batches(self):
        """Lists of SSE data payloads, as StreamRelay reads them from any upstream."""
        head = {"id": f"chatcmpl-mock-{os.urandom(6).hex()}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": "mock"}

        def chunk(delta: dict, finish_reason=None, **extra) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return json.dumps(head | {"choices": [choice]} | extra).encode()

        yield [chunk({"role": "assistant", "content": ""})]
        for position, word in enumerate(self._completion.text.split(" ")):
            if self._aborted.wait(self._word_delay) if self._word_delay else self._aborted.is_set():
                return
            yield [chunk({"content": word if position == 0 else " " + word})]
        usage = json.dumps(head | {"choices": [], "usage": usage_of(self._completion)}).encode()
        yield [chunk({}, self._completion.finish_reason), usage, b"[DONE]"]

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        self._aborted.set()


def message_text(content) -> str:
    """The text of a chat message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def usage_of(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


class BoundedRetryOpenAI(openai.OpenAI):
    """The SDK's client with retries that fit inside one web request.

    The SDK also retries 408, 409 and 429, and waits as long as a Retry-After header asks (up to two minutes);
    behind Heroku's 30 s router that wait would outlive the request. Here a 429 goes straight back to our client
    as a 503 with Retry-After, and only 5xx answers (plus the SDK's own timeout and connection retries) are retried,
    on the SDK's exponential back-off.
    """

    def _should_retry(self, response: httpx2.Response) -> bool:
        if response.headers.get("x-should-retry") == "false":
            return False
        return response.status_code >= 500

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
        return super()._calculate_retry_timeout(remaining_retries, options, None)


def retry_after_seconds(headers, default: int = 5) -> str:
    """The upstream's Retry-After as whole seconds for our client, kept between 1 and 60."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return str(min(60, max(1, round(float(headers.get(name)) / divisor))))
        except (TypeError, ValueError):
            continue
    return str(default)


def overloaded(error: openai.APIStatusError) -> ApiError:
    """A 503 that tells the client when to come back, for an upstream that is rate-limiting or overloaded."""
    # The seconds are in the message too: a batch's failed prompt has no header of its own.
    seconds = retry_after_seconds(error.response.headers)
    return ApiError(
        503,
        f"The model server is rate-limiting or overloaded; retry after {seconds} seconds.",
        code="upstream_rate_limited",
        headers={"Retry-After": seconds},
    )


def upstream_error_detail(error: openai.APIStatusError) -> dict | None:
    """The OpenAI-shaped error the upstream answered with ({"message": ...}), if it answered with one."""
    body = error.body.get("error", error.body) if isinstance(error.body, dict) else None
    return body if isinstance(body, dict) and isinstance(body.get("message"), str) else None


def names_the_model(error: openai.APIStatusError, model: str) -> bool:
    """Whether an upstream 404 is about the model asked for: OpenAI says so by code, Ollama and vLLM by its name."""
    detail = upstream_error_detail(error)
    if detail is None:
        return False
    return detail.get("code") == "model_not_found" or (isinstance(model, str) and bool(model) and model in detail["message"])


def upstream_message(error: openai.APIStatusError) -> str:
    """The upstream's own explanation of a rejected request, which helps the client fix it."""
    detail = upstream_error_detail(error)
    return (detail["message"] if detail else error.message)[:500]


class OpenAIProvider:
    """Chat Completions through one synchronous SDK client, built once per process."""

    def __init__(self, settings: Settings, http_client: httpx2.Client | None = None):
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "no-key-needed"
        self._api_key = api_key
        timeout = httpx2.Timeout(settings.openai_timeout, connect=min(5.0, settings.openai_timeout))
        self.client = BoundedRetryOpenAI(
            api_key=api_key,
            base_url=settings.openai_base_url,
            timeout=timeout,
            max_retries=settings.openai_max_retries,
            # Each request in flight may be a batch, with up to BATCH_CONCURRENCY upstream calls of its own.
            http_client=http_client
            or upstream_http_client(
                settings.in_flight_per_worker * settings.batch_concurrency, timeout, settings.openai_timeout
            ),
        )
        # Streams get a client of their own: no per-attempt deadline (a stream may last STREAM_MAX_SECONDS), and a
        # read timeout that is only a backstop, since StreamRelay bounds the waits itself (STREAM_*_TIMEOUT).
        backstop = max(settings.stream_first_token_timeout, settings.stream_idle_timeout) + 5
        stream_timeout = httpx2.Timeout(backstop, connect=min(5.0, settings.openai_timeout))
        self.stream_client = self.client.with_options(timeout=stream_timeout) if http_client else BoundedRetryOpenAI(
            api_key=api_key,
            base_url=settings.openai_base_url,
            timeout=stream_timeout,
            max_retries=settings.openai_max_retries,
            http_client=upstream_http_client(settings.in_flight_per_worker, stream_timeout, None),
        )
        # The SDK describes the platform in headers it works out once per process, running `uname -p` to do so.
        # Here that happens while the app is built, so in gunicorn's master, not on each worker's first request.
        self.client.platform_headers()
        self.stream_client.platform_headers()

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={str(self.client.base_url)!r})"

    def _redact(self, text: str) -> str:
        # A local server's placeholder key ("none", "ollama") is no secret, and replacing it would garble plain words.
        return text.replace(self._api_key, "[redacted]") if len(self._api_key) >= 16 else text

    def failure(self, error: openai.APIError, model: str) -> ApiError:
        """The ApiError, with the status the contract gives it, for the SDK's exception about a call for `model`."""
        if isinstance(error, openai.APITimeoutError):
            return ApiError(504, "The model server did not answer in time.", code="upstream_timeout")
        if isinstance(error, openai.APIConnectionError):
            return ApiError(502, "The model server could not be reached.", code="upstream_unavailable")
        if isinstance(error, openai.RateLimitError):
            if error.code == "insufficient_quota":
                # Our account is out of credit: retrying will not help, and only the operator can fix it.
                log.error("the model server says genapi's account is out of quota: check the OPENAI_API_KEY account")
                return ApiError(502, "The model server's quota for this service is used up.", code="upstream_quota_exceeded")
            return overloaded(error)
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            # Our own OPENAI_API_KEY is wrong: the operator must know, the client must learn nothing about the key.
            log.error(
                "the model server refused genapi's credentials (HTTP %s): check OPENAI_API_KEY and OPENAI_BASE_URL",
                error.status_code,
            )
            return ApiError(502, "The model server refused this service's credentials.", code="upstream_auth")
        if isinstance(error, (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError)):
            if error.status_code == 404 and not names_the_model(error, model):
                # Not "no such model": the server has no such route (OpenAI's own "unknown_url", a plain page, ...),
                # so OPENAI_BASE_URL is wrong, which only the operator can fix.
                log.error("the model server has no /chat/completions (HTTP 404): check OPENAI_BASE_URL")
                return ApiError(502, "The model server failed (HTTP 404).", code="upstream_error")
            return ApiError(
                400,
                f"The model server rejected the request: {self._redact(upstream_message(error))}",
                code="upstream_rejected_request",
            )
        if isinstance(error, openai.APIStatusError):
            if error.status_code == 503:  # still overloaded after the SDK's retries: the client should come back later
                return overloaded(error)
            return ApiError(502, f"The model server failed (HTTP {error.status_code}).", code="upstream_error")
        return ApiError(502, "The model server's answer was not usable.", code="upstream_bad_response")

    def chat(self, body: dict) -> tuple[bytes, dict]:
        """A Chat Completions call with the client's own body: the answer's JSON text as sent, and its parsed form."""
        try:
            response = self.client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        except openai.APIError as error:
            raise self.failure(error, body.get("model")) from None
        try:
            answer = response.json()
        except ValueError:
            raise ApiError(502, "The model server's answer was not valid JSON.", code="upstream_bad_response") from None
        if not isinstance(answer, dict):
            raise ApiError(502, "The model server's answer held no choices.", code="upstream_bad_response")
        return response.content, answer

    def open_stream(self, body: dict) -> HttpStream:
        """Start a streamed call; returns once the model server has answered with a success status.

        The SDK's retries happen in here, before the first byte reaches the client, and never after.
        """
        try:
            # With the raw response as the answer, the SDK hands it over unread: its SSE parsing and chunk models
            # would cost more CPU per chunk than the whole relay.
            response = self.stream_client.post(
                "/chat/completions", body=body, cast_to=httpx2.Response, stream=True, stream_cls=openai.Stream
            )
        except openai.APIError as error:
            raise self.failure(error, body.get("model")) from None
        return HttpStream(response)

    def complete(self, generation: Generation) -> Completion:
        body = chat_body(generation)
        started = time.perf_counter()
        try:
            # The SDK's client (auth, retries, timeouts, error classes) with the body as plain JSON and the answer as
            # the raw response: skipping the typed-params transform and the response model saves ~0.4 ms of CPU per
            # call (README, "Where the CPU goes"); _to_completion checks the answer's shape instead.
            response = self.client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        except openai.APIError as error:
            raise self.failure(error, generation.model) from None
        try:
            completion = response.json()
        except ValueError:  # json.JSONDecodeError, or a body that is not text
            raise ApiError(502, "The model server's answer was not valid JSON.", code="upstream_bad_response") from None
        upstream_ms = (time.perf_counter() - started) * 1000
        return self._to_completion(completion, response.headers.get("x-request-id"), upstream_ms)

    @staticmethod
    def _to_completion(completion, upstream_request_id, upstream_ms) -> Completion:
        """Check that the answer is a usable chat completion; anything else is the upstream's failure (502)."""
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ApiError(502, "The model server's answer held no choices.", code="upstream_bad_response")
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise ApiError(502, "The model server's answer held no text.", code="upstream_bad_response")
        usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
        finish_reason = choice.get("finish_reason")
        model = completion.get("model")
        return Completion(
            text=text,
            model=model if isinstance(model, str) and model else "unknown",
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            prompt_tokens=token_count(usage.get("prompt_tokens")),
            completion_tokens=token_count(usage.get("completion_tokens")),
            upstream_request_id=upstream_request_id,
            upstream_ms=upstream_ms,
        )


def chat_body(generation: Generation) -> dict:
    """The Chat Completions body that asks for one Generation."""
    messages = [{"role": "user", "content": generation.prompt}]
    if generation.system:
        messages.insert(0, {"role": "system", "content": generation.system})
    body = {"model": generation.model, "messages": messages, "max_tokens": generation.max_tokens}
    if generation.temperature is not None:
        body["temperature"] = generation.temperature
    return body


def token_count(value) -> int:
    """A usage count from the upstream's JSON; anything but a non-negative integer counts as 0."""
    return value if type(value) is int and value >= 0 else 0


def build_provider(settings: Settings, http_client: httpx2.Client | None = None):
    if settings.llm_provider == "mock":
        log.warning(
            "LLM_PROVIDER=mock: answers come from genapi's offline mock, not a model. "
            "Set OPENAI_API_KEY (and OPENAI_BASE_URL for Ollama, vLLM or llama.cpp) to use a real one."
        )
        return MockProvider(settings.mock_stream_delay)
    return OpenAIProvider(settings, http_client)
