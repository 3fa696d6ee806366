"""The model behind /generate: OpenAI (or any OpenAI-compatible server) through the SDK, or the offline mock.

Both take the same Generation and return the same Completion; every upstream failure leaves here as an ApiError
with the status the contract gives it, so the route never sees an SDK exception.
"""

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import httpx2
import openai

from config import Settings
from genapi.errors import ApiError

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
    """Answers offline and deterministically from the prompt, and says "model": "mock" so nobody mistakes it."""

    def complete(self, generation: Generation) -> Completion:
        seed = hashlib.sha256(generation.prompt.encode()).hexdigest()[:8]
        words = f"Mock answer {seed}: this is genapi's offline mock provider, not a model. You said: {generation.prompt}"
        words = words.split()
        text = " ".join(words[: generation.max_tokens])
        prompt_tokens = len(generation.prompt.split()) + len((generation.system or "").split())
        return Completion(
            text=text,
            model="mock",
            finish_reason="length" if len(words) > generation.max_tokens else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=min(len(words), generation.max_tokens),
        )


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


def upstream_message(error: openai.APIStatusError) -> str:
    """The upstream's own explanation of a rejected request, which helps the client fix it."""
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("error", body)
    message = detail.get("message") if isinstance(detail, dict) else None
    return str(message or error.message)[:500]


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
            or upstream_http_client(settings.in_flight_per_worker * settings.batch_concurrency, timeout),
        )
        # The SDK describes the platform in headers it works out once per process, running `uname -p` to do so.
        # Here that happens while the app is built, so in gunicorn's master, not on each worker's first request.
        self.client.platform_headers()

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={str(self.client.base_url)!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def complete(self, generation: Generation) -> Completion:
        messages = [{"role": "user", "content": generation.prompt}]
        if generation.system:
            messages.insert(0, {"role": "system", "content": generation.system})
        body = {"model": generation.model, "messages": messages, "max_tokens": generation.max_tokens}
        if generation.temperature is not None:
            body["temperature"] = generation.temperature
        started = time.perf_counter()
        try:
            # The SDK's client (auth, retries, timeouts, error classes) with the body as plain JSON and the answer as
            # the raw response: skipping the typed-params transform and the response model saves ~0.4 ms of CPU per
            # call (README, "Where the CPU goes"); _to_completion checks the answer's shape instead.
            response = self.client.post("/chat/completions", body=body, cast_to=httpx2.Response)
            completion = response.json()
        except openai.APITimeoutError:
            raise ApiError(504, "The model server did not answer in time.", code="upstream_timeout") from None
        except openai.APIConnectionError:
            raise ApiError(502, "The model server could not be reached.", code="upstream_unavailable") from None
        except openai.RateLimitError as error:
            raise ApiError(
                503,
                "The model server is rate-limiting or overloaded; retry after the Retry-After header's seconds.",
                code="upstream_rate_limited",
                headers={"Retry-After": retry_after_seconds(error.response.headers)},
            ) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            # Our own OPENAI_API_KEY is wrong: the operator must know, the client must learn nothing about the key.
            log.error(
                "the model server refused genapi's credentials (HTTP %s): check OPENAI_API_KEY and OPENAI_BASE_URL",
                error.status_code,
            )
            raise ApiError(502, "The model server refused this service's credentials.", code="upstream_auth") from None
        except (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError) as error:
            raise ApiError(
                400,
                f"The model server rejected the request: {self._redact(upstream_message(error))}",
                code="upstream_rejected_request",
            ) from None
        except openai.APIStatusError as error:
            raise ApiError(
                502, f"The model server failed (HTTP {error.status_code}).", code="upstream_error"
            ) from None
        except (json.JSONDecodeError, ValueError, TypeError):
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


def token_count(value) -> int:
    """A usage count from the upstream's JSON; anything but a non-negative integer counts as 0."""
    return value if type(value) is int and value >= 0 else 0


class ConnectionPerCallTransport(httpx2.BaseTransport):
    """An httpx2 transport that lends each upstream call a kept-alive connection of its own, at a constant cost.

    httpcore2's connection pool walks all its connections twice per call, probing the socket of every idle one, to
    choose which to reuse and which to close. With a connection kept alive per call in flight, that walk grew with
    the load: at 250 calls in flight per worker it was most of the difference between a worker's CPU per request
    at 32 and at 500 clients (README, "Where the CPU goes"). Here every idle connection waits in a transport of its
    own (httpx2's, limited to one connection) in a deque: a call takes the newest, or makes one, and puts it back
    when its response is closed. httpcore2 still checks that one connection (keep-alive expiry, closed by the
    server) before using it, and each put-back closes the oldest idle connection once it has outlived the
    keep-alive expiry, so a burst's connections do not stay open for good once the load falls.
    """

    def __init__(self, max_idle: int, keepalive_expiry: float = 5.0, **transport_options):
        self._max_idle = max_idle
        self._limits = httpx2.Limits(max_connections=1, keepalive_expiry=keepalive_expiry)
        # One SSL context for all: building one loads the CA bundle, which costs milliseconds and memory each time.
        transport_options.setdefault("verify", httpx2.create_ssl_context())
        self._transport_options = transport_options
        # (idle since, transport), oldest first; deque's append and pops are atomic, so gthread's threads may share it.
        self._idle: deque[tuple[float, httpx2.HTTPTransport]] = deque()
        self._closed = False

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            _, transport = self._idle.pop()
        except IndexError:
            transport = httpx2.HTTPTransport(limits=self._limits, **self._transport_options)
        try:
            response = transport.handle_request(request)
        except BaseException:
            self._put_back(transport)
            raise
        response.stream = _CallbackOnClose(response.stream, lambda: self._put_back(transport))
        return response

    def _put_back(self, transport: httpx2.HTTPTransport) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            transport.close()
            return
        now = time.monotonic()
        self._idle.append((now, transport))
        try:  # under gthread, another thread may take what this one looks at
            if now - self._idle[0][0] > self._limits.keepalive_expiry:
                self._idle.popleft()[1].close()
        except IndexError:
            pass

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop()[1].close()


class _CallbackOnClose(httpx2.SyncByteStream):
    """A response body that runs a callback once, after the body underneath is closed."""

    def __init__(self, stream, on_close):
        self._stream, self._on_close = stream, on_close

    def __iter__(self):
        return iter(self._stream)

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            self._stream.close()
        finally:
            if on_close is not None:
                on_close()


def upstream_http_client(in_flight: int, timeout: httpx2.Timeout) -> httpx2.Client:
    """The SDK's default httpx2 client, keeping a connection alive per call in flight, each lent in constant time.

    The SDK's default pool keeps only 100 idle connections; a gevent worker with 250 calls in flight would then
    close and reopen 150 upstream connections every round.
    """
    return openai.DefaultHttpxClient(timeout=timeout, transport=ConnectionPerCallTransport(max_idle=in_flight))


def probe_idle_connections_without_gevent() -> None:
    """Let httpcore2 check idle upstream connections with the C poll, not gevent's, in a gevent worker.

    Before each upstream call, and after it, httpcore2 polls every idle pooled connection (with a zero timeout) to
    see whether the server closed it. Under gevent's monkey-patching that poll is gevent's, Python code that builds
    watchers on the hub: with a connection kept per in-flight request it was a fifth of the service's CPU per
    request (README, "Where the CPU goes"). A zero-timeout poll never blocks, so the original is safe here.
    """
    import select

    import httpcore2._utils
    from gevent import monkey

    if monkey.is_module_patched("select"):
        httpcore2._utils.select = SimpleNamespace(
            poll=monkey.get_original("select", "poll"), POLLIN=select.POLLIN, select=select.select
        )


def build_provider(settings: Settings, http_client: httpx2.Client | None = None):
    if settings.llm_provider == "mock":
        log.warning(
            "LLM_PROVIDER=mock: answers come from genapi's offline mock, not a model. "
            "Set OPENAI_API_KEY (and OPENAI_BASE_URL for Ollama, vLLM or llama.cpp) to use a real one."
        )
        return MockProvider()
    return OpenAIProvider(settings, http_client)
