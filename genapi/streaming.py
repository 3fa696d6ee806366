"""Streams: the model server's stream relayed to the client as server-sent events, as it arrives.

One StreamRelay owns a stream's whole life. A reader thread (a greenlet under gevent) makes the upstream call and
reads its SSE lines onto a queue; the relay is the WSGI response iterable, waiting on that queue, and woken by the
worker's stream clock when a heartbeat is due while the model is silent, or when the stream is past a bound. Its
close(), which the WSGI server calls when the stream ends or the client goes away, closes the upstream, settles
usage, counts the metrics and writes the stream's one log line. It needs no Flask request context: what it needs
is captured when it is built.

Per chunk the relay reads only what it must (text, usage, finish_reason, errors), with one json.loads, and writes
the model server's own line through on /v1.
"""

import json
import logging
import math
import queue
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass

from flask import Response, g, request

from genapi import metrics
from genapi.clock import ProcessClock, members
from genapi.errors import ApiError
from genapi.logs import log_stream
from genapi.upstream_values import finish_reason as bounded_finish_reason
from genapi.upstream_values import model_name, upstream_id, usage_count

log = logging.getLogger("genapi")

HEARTBEAT = b": keep-alive\n\n"
OPENING = b": open\n\n"  # a comment sent with the headers, as soon as the model server has answered its status
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies such as nginx must not buffer it
SSE_MEDIA_TYPE = "text/event-stream"
DONE = b"[DONE]"

# What the reader thread puts on the queue, with a value each.
OPENED, BATCH, END, BROKEN, FAILED, WAKE = range(6)

# How a stream ended, for its log line and the genapi_stream_endings metric.
COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"
SHUTDOWN = "shutdown"
ENDINGS = (COMPLETED, CLIENT_DISCONNECTED, UPSTREAM_ERROR, TIMEOUT, SHUTDOWN)

# A rough rule for English text under OpenAI's tokenizers, for a stream that ended without the server's usage.
CHARACTERS_PER_TOKEN = 4

# Set when the worker is told to stop (gunicorn.conf.py): streams still running then end by this time.
_shutdown_at = math.inf
_live_relays: "weakref.WeakSet[StreamRelay]" = weakref.WeakSet()


def _wake_due_relays(now: float) -> None:
    for relay in members(_live_relays):
        if relay.wake_at <= now:
            relay.wake()


# Wakes each stream of this process when its next heartbeat or bound is due: one thread for all of them. A stream
# waits on its queue without a timeout: a timed wait per chunk would start and cancel a timer per chunk (under
# gevent, a Timeout and a libev timer each time), a few percent of the relay's CPU. The clock looks every quarter
# of the shortest limit a stream of this process has (at most every 0.25 s), so a heartbeat or a bound is late by
# at most that; while no stream runs, it rests.
_clock = ProcessClock("genapi-stream-clock", 0.25, tick=_wake_due_relays, has_work=lambda: bool(_live_relays))


def begin_shutdown(seconds: float) -> None:
    """The worker stops in `seconds`: every stream still running by then ends with an error event, not a cut."""
    global _shutdown_at
    _shutdown_at = time.monotonic() + seconds
    for relay in members(_live_relays):
        relay.wake()


@dataclass(frozen=True)
class StreamLimits:
    heartbeat: float
    first_token: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls, settings) -> "StreamLimits":
        return cls(
            settings.stream_heartbeat_seconds,
            settings.stream_first_token_timeout,
            settings.stream_idle_timeout,
            settings.stream_max_seconds,
        )


class HttpStream:
    """A streamed upstream response, read as lists of SSE data payloads; abort() may be called from another thread."""

    def __init__(self, response):
        self._response = response
        self._lock = threading.Lock()
        self._open = True
        self.upstream_request_id = response.headers.get("x-request-id")  # checked by upstream_id() before logging

    def batches(self):
        """Each network read's complete events, as the list of their data payloads (b'{...}' or b'[DONE]').

        The reads wait without a timeout: the relay bounds every wait of a stream and ends one by shutting its
        socket (abort). Once [DONE] is in, the rest of the body (its end, which lets the connection be kept alive)
        is read with the call's own read timeout, since the relay may have ended by then.
        """
        body = self._response.extensions.get("connection_body")  # genapi.upstream_http.ConnectionBody, or None
        if body is not None:
            body.read_timeout = None
        pending = b""
        # The body as the transport gives it (genapi.upstream_http, which has decoded it): httpx2's iter_bytes()
        # would pass each read through three more generators, a decoder and a chunker that change nothing.
        for data in self._response.stream:
            pending += data
            if b"\r" in pending:
                pending = pending.replace(b"\r\n", b"\n")
            if b"\n\n" not in pending:
                continue
            *events, pending = pending.split(b"\n\n")
            payloads = []
            for event in events:
                if event.startswith(b"data: ") and b"\n" not in event:  # nearly every event: one data line
                    payloads.append(event[6:])
                    continue
                lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
                if lines:
                    payloads.append(b"\n".join(lines))
            if payloads:
                if body is not None and DONE in payloads:
                    body.read_timeout = body.call_read_timeout
                yield payloads

    def abort(self) -> None:
        """Wake a reader blocked on the socket: under threads a close would not, so the socket is shut down first."""
        with self._lock:
            if not self._open:
                return
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is None:
                self._response.close()
                return
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:  # after this, the connection may go back to the pool: abort() must not touch it
            self._open = False
        self._response.close()


class CachedStream:
    """A cached answer as the model server's chunks, so that a cache hit streams like any answer."""

    upstream_request_id = None

    def __init__(self, stored: dict):
        self._stored = stored

    def batches(self):
        stored = self._stored
        head = {"object": "chat.completion.chunk", "model": stored["model"]}
        text = {"choices": [{"index": 0, "delta": {"content": stored["response"]}, "finish_reason": None}]}
        finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": stored["finish_reason"]}]}
        usage = {"choices": [], "usage": stored["usage"]}
        yield [json.dumps(head | part).encode() for part in (text, finish, usage)] + [DONE]

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class GenerateEvents:
    """POST /generate's events: `delta` with {"text"}, then `done` with the success fields, or `error`."""

    def __init__(self, answer_id: str, cached: bool):
        self.answer_id = answer_id
        self.cached = cached

    @staticmethod
    def chunk(payload: bytes, chunk: dict, text: str | None) -> bytes | None:
        if not text:
            return None
        return b'event: delta\ndata: {"text": ' + json.dumps(text).encode() + b"}\n\n"

    def done(self, model: str, finish_reason: str | None, usage: dict) -> bytes:
        summary = {"model": model, "finish_reason": finish_reason, "usage": usage}
        summary |= {"id": self.answer_id, "cached": self.cached}
        return b"event: done\ndata: " + json.dumps(summary).encode() + b"\n\n"

    @staticmethod
    def error(error: ApiError) -> bytes:
        return b"event: error\ndata: " + json.dumps(error.body()).encode() + b"\n\n"


class ChatChunks:
    """/v1/chat/completions's stream: the model server's own `data:` lines, `data: [DONE]`, or `data: {"error"}`.

    Usage is always asked of the model server; its usage chunk (no choices) reaches the client only if it asked.
    """

    def __init__(self, include_usage: bool):
        self.include_usage = include_usage

    def chunk(self, payload: bytes, chunk: dict, text: str | None) -> bytes | None:
        if not self.include_usage and not chunk.get("choices") and "usage" in chunk:
            return None
        return b"data: " + payload + b"\n\n"

    @staticmethod
    def done(model: str, finish_reason: str | None, usage: dict) -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def error(error: ApiError) -> bytes:
        # The OpenAI SDKs raise on a data object holding "error"; without [DONE] no client takes the stream as whole.
        return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


class StreamRelay:
    """One stream, from the upstream call to the log line: the WSGI response iterable, closed by the WSGI server."""

    def __init__(self, open_upstream, shape, limits: StreamLimits, record: dict, prompt_chars: int, model: str,
                 on_complete=None, record_usage=None, reservation=None):
        self._open_upstream = open_upstream  # called in the reader thread; returns an HttpStream-like object
        self._shape = shape
        self._limits = limits
        self._record = record  # the request's log fields, captured by the view
        self._prompt_chars = prompt_chars
        self._on_complete = on_complete  # called with the stored answer of a stream that completed (the cache)
        self._record_usage = record_usage  # the usage ledger's row, written once the stream has ended (genapi.usage)
        self._reservation = reservation  # the key's token budget held for this stream (genapi.budgets), or None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._upstream = None
        self._aborted = False
        self._started = time.monotonic()
        self._started_perf = record.pop("started")
        self._route = record.pop("route")
        self._first_chunk_at: float | None = None
        self._last_chunk_at = self._started
        self._last_write = self._started
        self._chunks = 0
        self._pieces: list[str] = []
        self._characters = 0
        self._usage: dict | None = None
        self._finish_reason: str | None = None
        self._model = model
        self._renamed_model: tuple[bytes, bytes] | None = None  # (as the server names it, as genapi does), in JSON
        self._chunk_id = None
        self._ending: str | None = None
        self._error: ApiError | None = None
        self._settled = False
        self._generator = self._relay()
        self._iterating = False
        self._opened = False  # the model server answered with a success status before the first byte
        self._client_socket = None  # the client's connection, to see a hang-up before a heartbeat (watch_client)
        self.wake_at = math.inf  # when the stream's clock must wake it: its next heartbeat, or its bound
        self._wake_pending = False  # a WAKE is on the queue already: the clock does not pile them up

    # -- the view's side, in the request -------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._read, name="genapi-stream", daemon=True).start()

    def wait_for_status(self) -> None:
        """Hold the first byte until the model server has answered with its status; its refusal is an ApiError.

        The wait ends by the time a heartbeat must go out; after that the stream begins with heartbeats and a
        later refusal becomes an error event.
        """
        seconds = min(self._limits.heartbeat, self._limits.first_token, self._limits.total)
        try:
            kind, value = self._queue.get(timeout=seconds)
        except queue.Empty:
            if time.monotonic() - self._started >= self._limits.first_token:
                self._abort_upstream()
                raise ApiError(504, "The model server did not answer in time.", code="upstream_timeout") from None
            return
        if kind == FAILED:
            raise value
        self._opened = True  # the status is a success; the stream's first chunk comes through the queue

    def release_reservation(self) -> None:
        """The call was refused before the stream's first byte: it cost nothing."""
        if self._reservation is not None:
            self._reservation.release()

    def wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self._queue.put((WAKE, None))

    def watch_client(self, client_socket) -> None:
        """The client's socket (gunicorn's), checked before each heartbeat; None (a test client) skips the check."""
        self._client_socket = client_socket

    def response(self) -> Response:
        _live_relays.add(self)
        limits = self._limits
        _clock.wake(min(limits.heartbeat, limits.first_token, limits.idle, limits.total) / 4)
        metrics.STREAMS_IN_FLIGHT.inc()
        # Passed through to the WSGI server as it is: werkzeug would wrap each chunk in two more generators.
        return Response(self, mimetype=SSE_MEDIA_TYPE, headers=SSE_HEADERS, direct_passthrough=True)

    # -- the reader thread ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            upstream = self._open_upstream()
        except ApiError as error:
            self._queue.put((FAILED, error))
            return
        except Exception:
            log.exception("a stream's upstream call failed unexpectedly")
            self._queue.put((FAILED, ApiError(500, "Internal error; it has been logged.", code="internal_error")))
            return
        self._upstream = upstream
        if self._aborted:  # the relay ended while the call was being made
            upstream.abort()
        self._queue.put((OPENED, None))
        try:
            for batch in upstream.batches():
                self._queue.put((BATCH, batch))
                if self._aborted:
                    break
            self._queue.put((END, None))
        except Exception as error:  # the connection broke mid-stream (httpx2's ReadError, RemoteProtocolError, ...)
            self._queue.put((BROKEN, error))
        finally:
            upstream.close()

    def _abort_upstream(self) -> None:
        self._aborted = True
        upstream = self._upstream
        if upstream is not None:
            upstream.abort()

    # -- the WSGI server's side ----------------------------------------------------------------------------------
    def __iter__(self):
        self._iterating = True
        return self._generator

    def close(self) -> None:
        """Called by the WSGI server when the stream ended or the client went away; settles the stream once."""
        if self._iterating:
            self._generator.close()  # its `finally` settles
        self._settle()

    def _relay(self):
        try:
            yield from self._events()
        finally:
            self._settle()

    def _bound(self) -> tuple[float, str]:
        """When the stream must end unless a chunk comes, and how it would end then."""
        if self._first_chunk_at is None:
            bound = self._started + self._limits.first_token
        else:
            bound = self._last_chunk_at + self._limits.idle
        bound = min(bound, self._started + self._limits.total)
        return (_shutdown_at, SHUTDOWN) if _shutdown_at < bound else (bound, TIMEOUT)

    def _client_hung_up(self) -> bool:
        """Whether the client has closed its side of the connection, found without blocking.

        A write after the client's FIN still succeeds (only the one after the peer's RST fails), so a heartbeat
        alone would notice a client gone only at the heartbeat after. A socket that is readable with data waiting
        (a pipelined request) has not hung up; under gevent `select` is gevent's, so nothing here blocks the hub.
        """
        sock = self._client_socket
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except ValueError:  # a socket that cannot peek (TLS): the heartbeat's write will tell
            return False
        except OSError:  # reset by the client
            return True

    def _events(self):
        if self._opened:  # headers and a first byte now, not at the first heartbeat: the model server has answered
            self._last_write = time.monotonic()
            yield OPENING
        while True:
            now = time.monotonic()
            bound, ending = self._bound()
            if now >= bound:
                yield self._end_with_error(ending)
                return
            heartbeat_at = self._last_write + self._limits.heartbeat
            if now >= heartbeat_at:
                if self._client_hung_up():
                    self._ending = CLIENT_DISCONNECTED  # settled by the `finally`, which closes the upstream
                    return
                self._last_write = now
                yield HEARTBEAT  # a client that went away without a FIN makes this write fail: close() follows
                continue
            self.wake_at = min(bound, heartbeat_at)
            kind, value = self._queue.get()  # a chunk, or the stream clock when the wait is over
            if kind == BATCH:
                out, done_seen = self._read_batch(value)
                if done_seen and self._ending is None:  # [DONE]: the answer is whole, whatever else the body holds
                    self._ending = COMPLETED
                    out += self._shape.done(self._model, self._finish_reason, self._settled_usage())
                if out:
                    self._last_write = self._last_chunk_at
                    yield out
                if self._ending is not None:  # completed, or the model server sent an error object
                    return
            elif kind == END or kind == BROKEN:
                if kind == END and self._finish_reason is not None:  # a server that sends no [DONE]
                    self._ending = COMPLETED
                    yield self._shape.done(self._model, self._finish_reason, self._settled_usage())
                    return
                if kind == BROKEN:
                    log.warning("a stream's upstream connection broke: %s", type(value).__name__)
                cut = ApiError(502, "The model server's stream ended before the answer was complete.",
                               code="upstream_error")
                yield self._end_with_error(UPSTREAM_ERROR, cut)
                return
            elif kind == FAILED:
                yield self._end_with_error(TIMEOUT if value.code == "upstream_timeout" else UPSTREAM_ERROR, value)
                return
            elif kind == WAKE:
                self._wake_pending = False
            # OPENED and WAKE: nothing to send; the loop works out the heartbeat and the bound again.

    def _read_batch(self, payloads: list[bytes]) -> tuple[bytes, bool]:
        """What to send for one batch of the model server's payloads, and whether it held [DONE]."""
        done_seen = False
        now = time.monotonic()
        if self._first_chunk_at is None:
            self._first_chunk_at = now
            metrics.STREAM_FIRST_TOKEN_SECONDS.observe(now - self._started)
        self._last_chunk_at = now
        out = []
        for payload in payloads:
            if payload == DONE:
                done_seen = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                bad = ApiError(502, "The model server's stream held a chunk that is not JSON.", code="upstream_bad_response")
                out.append(self._end_with_error(UPSTREAM_ERROR, bad))
                break
            if chunk.get("error"):
                failed = ApiError(502, "The model server reported an error during the stream.", code="upstream_error")
                out.append(self._end_with_error(UPSTREAM_ERROR, failed))
                break
            self._chunks += 1
            text = None
            choices = chunk.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                choice = choices[0]
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(text, str):
                    self._pieces.append(text)
                    self._characters += len(text)
                else:
                    text = None
                self._finish_reason = bounded_finish_reason(choice.get("finish_reason")) or self._finish_reason
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
            if self._chunks == 1:
                self._read_first_chunk(chunk)
            if self._renamed_model is not None:
                payload = payload.replace(*self._renamed_model)
            piece = self._shape.chunk(payload, chunk, text)
            if piece:
                out.append(piece)
        return b"".join(out), done_seen

    def _read_first_chunk(self, chunk: dict) -> None:
        """The model and the id the first chunk names; a model named by a path on the server's disk is renamed in
        every chunk passed on, as it would be in a whole answer (genapi.upstream_values)."""
        reported = chunk.get("model")
        if isinstance(reported, str) and reported:
            self._model = model_name(reported, self._model)
            if self._model != reported:
                self._renamed_model = (json.dumps(reported).encode(), json.dumps(self._model).encode())
        self._chunk_id = chunk.get("id")

    def _end_with_error(self, ending: str, error: ApiError | None = None) -> bytes:
        if error is None and ending == SHUTDOWN:
            error = ApiError(503, "The server is restarting; the answer was cut short. Send the request again.",
                             code="server_shutting_down", error_type="service_unavailable")
        elif error is None:
            waited = "first chunk" if self._first_chunk_at is None else "next chunk"
            error = ApiError(504, f"The model server did not send its {waited} in time.", code="upstream_timeout")
        self._ending, self._error = ending, error
        self._abort_upstream()
        return self._shape.error(error)

    def _settled_usage(self) -> dict:
        """The model server's usage, or an estimate from the characters (marked `estimated`) when it sent none."""
        usage = self._usage or {}
        prompt_tokens, completion_tokens = usage_count(usage.get("prompt_tokens")), usage_count(usage.get("completion_tokens"))
        if prompt_tokens is not None and completion_tokens is not None:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}
        prompt_tokens = -(-self._prompt_chars // CHARACTERS_PER_TOKEN)
        completion_tokens = -(-self._characters // CHARACTERS_PER_TOKEN)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "estimated": True}

    def _settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        if self._ending is None:  # the generator was closed before the end: the client went away
            self._ending = CLIENT_DISCONNECTED
        if self._ending != COMPLETED:  # a completed stream's reader reads to the end, and keeps the connection
            self._abort_upstream()
        _live_relays.discard(self)
        usage = self._settled_usage()
        estimated = usage.get("estimated", False)
        if self._reservation is not None:
            # Each stream settles its own reservation here, once, however it ended: a call that failed before
            # the model sent anything costs nothing; any other stream costs its real usage, or the estimate.
            if self._ending in (UPSTREAM_ERROR, TIMEOUT) and self._chunks == 0:
                self._reservation.release()
            else:
                self._reservation.settle(usage["total_tokens"])
        seconds = time.perf_counter() - self._started_perf
        record = self._record
        metrics.STREAMS_IN_FLIGHT.dec()
        metrics.count_request(self._route, record["method"], 200, seconds)
        metrics.count_stream(self._ending, usage["prompt_tokens"], usage["completion_tokens"], estimated)
        if self._error is not None and self._ending in (UPSTREAM_ERROR, TIMEOUT):
            metrics.count_upstream_error(self._error.code)
        text = "".join(self._pieces)
        if self._ending == COMPLETED and self._on_complete is not None and not estimated:
            usage_stored = {key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
            self._on_complete({"response": text, "model": self._model, "finish_reason": self._finish_reason,
                               "usage": usage_stored})
        if self._record_usage is not None:
            self._record_usage(
                model=self._model, prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                estimated=estimated, status=200, error_code=self._error.code if self._error is not None else None,
                duration_ms=seconds * 1000,
            )
        upstream = self._upstream
        fields = record | {
            "status": 200,
            "error_code": self._error.code if self._error is not None else None,
            "duration_ms": round(seconds * 1000, 2),
            "stream_ending": self._ending,
            "first_token_ms": round((self._first_chunk_at - self._started) * 1000, 2) if self._first_chunk_at else None,
            "chunks": self._chunks,
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "tokens_estimated": estimated,
            "upstream_request_id": upstream_id(upstream.upstream_request_id if upstream else None, self._chunk_id),
        }
        exchange = fields.pop("exchange", None)  # present only with LOG_PROMPTS=true
        if exchange is not None:
            fields |= exchange | {"output": text}
        log_stream(fields, logging.ERROR if self._ending in (UPSTREAM_ERROR, TIMEOUT) else logging.INFO)


def stream_response(relay: StreamRelay) -> Response:
    """Start the relay's upstream call and answer with its stream, or raise the refusal that came before any byte."""
    relay.start()
    try:
        relay.wait_for_status()
    except ApiError as error:
        relay.release_reservation()
        metrics.count_upstream_error(error.code)
        raise
    g.stream_relay = relay  # finish_request leaves the log line and the metrics of a stream to the relay
    relay.watch_client(request.environ.get("gunicorn.socket"))
    return relay.response()
