"""The HTTP under the OpenAI SDK: kept-alive upstream connections lent in constant time, each attempt on a deadline.

The SDK is unchanged; it gets `upstream_http_client()` as its httpx2 client. Every upstream byte passes the
transport here, so it also bounds what an answer may be: no redirect is followed, and no answer may be larger than
MAX_UPSTREAM_BYTES, as sent or once decompressed. Two things here reach into httpcore2, and a test covers each: the
network backend of a one-connection transport's pool, and the `select` module its idle-connection check uses.
"""

import math
import socket
import time
import weakref
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as LookupTimeout
from types import SimpleNamespace

import h11
import httpcore2
import httpx2
import openai
from httpcore2._sync.http11 import HTTP11Connection
from httpx2._transports.default import map_httpcore_exceptions

from genapi.clock import ProcessClock, members


class UpstreamAnswerRefused(openai.OpenAIError):
    """An upstream answer genapi will not read. An OpenAIError, so the SDK passes it on at once, without retrying."""


class UpstreamAnswerTooLarge(UpstreamAnswerRefused):
    def __init__(self, limit: int):
        super().__init__(f"the answer is larger than MAX_UPSTREAM_BYTES ({limit} bytes)")


class UpstreamRedirected(UpstreamAnswerRefused):
    """A 3xx: an OpenAI-compatible API has no reason to redirect, and following one would send the prompt elsewhere."""

    def __init__(self, status: int, location: str):
        self.status = status
        self.target = redirect_target(location)
        super().__init__(f"HTTP {status} to {self.target}")


def redirect_target(location: str) -> str:
    """Where a redirect points, for the log: only its scheme and host, never its path or query (a token may be there)."""
    if not location:
        return "nowhere (no Location)"
    try:
        url = httpx2.URL(location)
    except (httpx2.InvalidURL, ValueError, TypeError):
        return "an unreadable Location"
    if not url.host:
        return "the same host"
    return f"{url.scheme}://{url.host}"[:200]


class ConnectionPerCallTransport(httpx2.BaseTransport):
    """An httpx2 transport that lends each upstream call a kept-alive connection of its own, at a constant cost.

    httpcore2's connection pool walks all its connections twice per call, probing the socket of every idle one, to
    choose which to reuse and which to close. With a connection kept alive per call in flight, that walk grew with
    the load: at 250 calls in flight per worker it was most of the difference between a worker's CPU per request
    at 32 and at 500 clients (docs/cpu-profile.md). Here every idle connection waits in a transport of its
    own (httpx2's, limited to one connection) in a deque: a call takes the newest, or makes one, and puts it back
    when its response is closed. httpcore2 still checks that one connection (keep-alive expiry, closed by the
    server) before using it, and each put-back closes the oldest idle connection once it has outlived the
    keep-alive expiry, so a burst's connections do not stay open for good once the load falls. In a process that
    gets no more calls, a reaper thread closes them instead: otherwise a worker left idle after a burst
    would hold hundreds of connections the model server has long closed on its side.

    With `attempt_seconds`, each call (one attempt of the SDK's) must be over within that many seconds, from
    connecting to the last byte of the answer: httpx2's own timeouts count each step afresh, so a slow connect
    followed by a slow answer, or an answer that trickles in, would otherwise outlive it.
    """

    def __init__(
        self,
        max_idle: int,
        keepalive_expiry: float = 5.0,
        attempt_seconds: float | None = None,
        max_answer_bytes: int | None = None,
        **options,
    ):
        self._max_idle = max_idle
        self._attempt_seconds = attempt_seconds
        self._max_answer_bytes = max_answer_bytes
        self._limits = httpx2.Limits(max_connections=1, keepalive_expiry=keepalive_expiry)
        # One SSL context for all: building one loads the CA bundle, which costs milliseconds and memory each time.
        options.setdefault("verify", httpx2.create_ssl_context())
        self._transport_options = options
        # (idle since, connection), oldest first; deque's append and pops are atomic, so gthread's threads may share it.
        self._idle: deque[tuple[float, KeptConnection]] = deque()
        self._closed = False
        _transports.add(self)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            _, connection = self._idle.pop()
        except IndexError:
            connection = KeptConnection(self._limits, self._transport_options)
        if self._attempt_seconds is not None:
            # A call may ask for less (a batch's last prompts, with little of the request's budget left).
            asked = (request.extensions.get("timeout") or {}).get("read")
            seconds = min(self._attempt_seconds, asked) if asked else self._attempt_seconds
            connection.deadline.at = time.monotonic() + seconds
        if self._max_answer_bytes is not None:
            request.headers["Accept-Encoding"] = "gzip, deflate"  # the encodings BoundedBody can bound
        try:
            response = connection.transport.handle_request(request)
        except BaseException:
            self._put_back(connection)
            raise
        body = connection.body(response, request)
        if isinstance(body, ConnectionBody):
            response.extensions["connection_body"] = body  # for a stream's reader to set its read timeout
        response.stream = _CallbackOnClose(body, lambda: self._put_back(connection))
        if 300 <= response.status_code < 400:
            response.close()
            raise UpstreamRedirected(response.status_code, response.headers.get("location", ""))
        if self._max_answer_bytes is not None:
            response.stream = BoundedBody(response.stream, response.headers, self._max_answer_bytes)
        return response

    def _put_back(self, connection: "KeptConnection") -> None:
        connection.deadline.at = math.inf
        if self._closed or len(self._idle) >= self._max_idle:
            connection.close()
            return
        now = time.monotonic()
        self._idle.append((now, connection))
        if self._closed:  # close() ran between the check above and the append
            self.close()
            return
        self.close_expired(now)
        _reaper.wake(self._limits.keepalive_expiry)

    def close_expired(self, now: float) -> None:
        """Close the idle connections that have outlived the keep-alive expiry, oldest first."""
        try:  # under gthread, another thread may take what this one looks at
            while now - self._idle[0][0] > self._limits.keepalive_expiry:
                self._idle.popleft()[1].close()
        except IndexError:  # none left, or another thread took the last one
            pass

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            try:
                self._idle.pop()[1].close()
            except IndexError:  # another thread emptied it first
                break


def _close_expired_connections(now: float) -> None:
    for transport in members(_transports):
        transport.close_expired(now)


# Every transport of the process, for the reaper: built in gunicorn's master, so known to every worker.
_transports: "weakref.WeakSet[ConnectionPerCallTransport]" = weakref.WeakSet()
# Closes idle connections once they outlive their keep-alive expiry while no call comes to do it, looking every
# shortest expiry, resting while no connection is idle.
_reaper = ProcessClock("genapi-idle-reaper", math.inf, tick=_close_expired_connections,
                       has_work=lambda: any(transport.has_idle for transport in members(_transports)))


class KeptConnection:
    """One kept-alive upstream connection: an httpx2 transport limited to it, and the deadline its I/O keeps to."""

    def __init__(self, limits: httpx2.Limits, options: dict):
        self.transport = httpx2.HTTPTransport(limits=limits, **options)
        self.deadline = Deadline()
        # httpx2's transport takes no network backend, but its httpcore2 pool does, and opens its connection with it.
        self.transport._pool._network_backend = DeadlineBackend(self.deadline)

    @property
    def is_open(self) -> bool:
        return bool(self.transport._pool.connections)

    def body(self, response: httpx2.Response, request: httpx2.Request) -> httpx2.SyncByteStream:
        """The answer's body, to be read off the connection (ConnectionBody) when it is an HTTP/1.1 one."""
        connections = self.transport._pool.connections
        http11 = getattr(connections[0], "_connection", None) if connections else None
        if not isinstance(http11, HTTP11Connection) or response.status_code == 101:
            return response.stream
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        return ConnectionBody(response.stream, http11, read_timeout)

    def close(self) -> None:
        self.transport.close()


class Deadline:
    """When the current attempt must be over (time.monotonic()); infinite between attempts."""

    def __init__(self):
        self.at = math.inf

    def bound(self, timeout: float | None, timeout_error: type[Exception]) -> float | None:
        """The step's own timeout, shortened to the time the attempt has left; past the deadline, the timeout error."""
        if self.at == math.inf:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise timeout_error("the upstream attempt ran out of time")
        return left if timeout is None else min(timeout, left)


class DeadlineBackend(httpcore2.NetworkBackend):
    """httpcore2's socket backend, with every connect, read and write bounded by the attempt's deadline."""

    def __init__(self, deadline: Deadline):
        self._backend = httpcore2.SyncBackend()
        self._deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        # socket.create_connection would give each of the host's addresses the whole timeout; here they share the
        # time the attempt has left, as the name lookup does before them.
        addresses = resolve(host, port, self._deadline.bound(timeout, httpcore2.ConnectTimeout))
        for position, (*_, address) in enumerate(addresses):
            try:
                ip_timeout = self._deadline.bound(timeout, httpcore2.ConnectTimeout)
                stream = self._backend.connect_tcp(address[0], port, ip_timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout):
                if position == len(addresses) - 1:
                    raise
                continue
            return DeadlineStream(stream, self._deadline)
        raise httpcore2.ConnectError(f"{host} has no address")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        timeout = self._deadline.bound(timeout, httpcore2.ConnectTimeout)
        return DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options), self._deadline)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# The system resolver retries on its own (5 s a try, a few tries, per name server), past any attempt's deadline; a
# lookup runs here so that the caller waits only as long as the attempt has left. Under gevent these are greenlets.
_resolver = ThreadPoolExecutor(max_workers=16, thread_name_prefix="genapi-resolve")


def resolve(host: str, port: int, seconds: float | None) -> list:
    """The host's addresses, looked up within `seconds` (None: as long as the resolver takes)."""
    try:
        if seconds is None:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        lookup = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            return lookup.result(timeout=seconds)
        except LookupTimeout:
            lookup.cancel()  # if it has not started; a lookup under way ends when the resolver gives up
            raise httpcore2.ConnectTimeout(f"the name lookup of {host} took longer than the attempt had left") from None
    except OSError as error:
        raise httpcore2.ConnectError(str(error)) from error


# Small enough that a server reading slowly cannot hold one write much past the deadline; a request body is rarely
# more than a few of them.
WRITE_SLICE_BYTES = 16 * 1024


class DeadlineStream(httpcore2.NetworkStream):
    """A connection's stream whose reads and writes keep to the attempt's deadline, and whose small writes wait.

    httpcore2 writes a request's headers and its body apart. Held here until the answer is read, or until there is
    a slice's worth, they go out together: one send and one TCP segment per call instead of two.
    """

    def __init__(self, stream: httpcore2.NetworkStream, deadline: Deadline):
        self._stream, self._deadline = stream, deadline
        self._unsent = b""
        self._write_timeout: float | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._unsent:
            self._send_unsent()
        return self._stream.read(max_bytes, self._deadline.bound(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._unsent += buffer
        self._write_timeout = timeout
        if len(self._unsent) >= WRITE_SLICE_BYTES:
            self._send_unsent()

    def _send_unsent(self) -> None:
        buffer, self._unsent = self._unsent, b""
        # httpcore2 gives every send() of one write the same timeout; in slices, each slice gets the time left.
        for start in range(0, len(buffer), WRITE_SLICE_BYTES):
            piece = buffer[start : start + WRITE_SLICE_BYTES]
            self._stream.write(piece, self._deadline.bound(self._write_timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> "DeadlineStream":
        try:
            timeout = self._deadline.bound(timeout, httpcore2.ConnectTimeout)
        except httpcore2.ConnectTimeout:
            self._stream.close()  # httpcore2 closes the stream start_tls gives back, not this one
            raise
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class BoundedBody(httpx2.SyncByteStream):
    """An answer's body, decompressed here (gzip, deflate) and cut off past `limit` bytes, as sent and as decoded.

    httpx2 would inflate a whole answer at once: a few hundred kilobytes of gzip can hold gigabytes. Here each step
    inflates at most what is left of the limit, and the response's headers are changed to say that the body is no
    longer encoded, so httpx2 does not decode it again.
    """

    def __init__(self, stream, headers: httpx2.Headers, limit: int):
        self._stream, self._limit = stream, limit
        encoding = headers.get("content-encoding", "").strip().lower()
        self._inflater = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            # gzip, or deflate in its standard (zlib) form: the header tells which.
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
            del headers["content-encoding"]
            headers.pop("content-length", None)

    def __iter__(self):
        received = decoded = 0
        for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                raise UpstreamAnswerTooLarge(self._limit)
            if self._inflater is None:
                yield chunk
                continue
            pending = chunk
            while pending:
                try:
                    piece = self._inflater.decompress(pending, self._limit - decoded + 1)
                except zlib.error as error:
                    raise httpx2.DecodingError(f"the answer's compressed body is broken: {error}") from None
                decoded += len(piece)
                if decoded > self._limit:
                    raise UpstreamAnswerTooLarge(self._limit)
                if piece:
                    yield piece
                pending = self._inflater.unconsumed_tail
        if self._inflater is not None:
            tail = self._inflater.flush()
            if decoded + len(tail) > self._limit:
                raise UpstreamAnswerTooLarge(self._limit)
            if tail:
                yield tail

    def close(self) -> None:
        self._stream.close()


class ConnectionBody(httpx2.SyncByteStream):
    """An HTTP/1.1 answer's body read off its connection through h11, as httpcore2 reads it, with fewer layers.

    Through httpcore2 and httpx2, every network read of the body passes five generators and three context managers
    before it reaches the reader: for a relayed stream, whose reads are one chunk each, that was a fifth of the
    relay's CPU (docs/benchmark-streaming.md). Here h11 still parses the framing (chunked, sized or until closed),
    the read keeps the attempt's deadline (DeadlineStream), errors are httpx2's, as they were, and a body read to its
    end leaves the connection ready to be kept alive. Closing is the transport's stream's, unchanged: it returns a
    connection whose answer was read to the end to the pool, and closes any other.

    `read_timeout` (the call's, at first) may be changed between reads: a stream's relay bounds its waits itself
    and reads without one (genapi.streaming.HttpStream). Under gevent a read with a timeout starts and cancels a
    timer per chunk, which was 8% of the relay's CPU.
    """

    def __init__(self, stream: httpx2.SyncByteStream, connection: HTTP11Connection, read_timeout: float | None):
        self._stream, self._connection = stream, connection
        self.call_read_timeout = self.read_timeout = read_timeout

    def __iter__(self):
        with map_httpcore_exceptions():
            yield from self._data()

    def _data(self):
        state, network = self._connection._h11_state, self._connection._network_stream
        read_size = self._connection.READ_NUM_BYTES
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as error:
                raise httpcore2.RemoteProtocolError(str(error)) from error
            if event is h11.NEED_DATA:
                state.receive_data(network.read(read_size, self.read_timeout))
            elif type(event) is h11.Data:
                yield bytes(event.data)
            elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return

    def close(self) -> None:
        self._stream.close()


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


def upstream_http_client(
    in_flight: int, timeout: httpx2.Timeout, attempt_seconds: float, max_answer_bytes: int
) -> httpx2.Client:
    """The SDK's default httpx2 client, keeping a connection alive per call in flight, each lent in constant time.

    The SDK's default pool keeps only 100 idle connections; a gevent worker with 250 calls in flight would then
    close and reopen 150 upstream connections every round. Redirects are the transport's to refuse, not to follow.
    """
    transport = ConnectionPerCallTransport(
        max_idle=in_flight, attempt_seconds=attempt_seconds, max_answer_bytes=max_answer_bytes
    )
    return openai.DefaultHttpxClient(timeout=timeout, transport=transport, follow_redirects=False)


def probe_idle_connections_without_gevent() -> None:
    """Let httpcore2 check idle upstream connections with the C poll, not gevent's, in a gevent worker.

    Before each upstream call, and after it, httpcore2 polls every idle pooled connection (with a zero timeout) to
    see whether the server closed it. Under gevent's monkey-patching that poll is gevent's, Python code that builds
    watchers on the hub: with a connection kept per in-flight request it was a fifth of the service's CPU per
    request (docs/cpu-profile.md). A zero-timeout poll never blocks, so the original is safe here.
    """
    import select

    import httpcore2._utils
    from gevent import monkey

    if monkey.is_module_patched("select"):
        httpcore2._utils.select = SimpleNamespace(
            poll=monkey.get_original("select", "poll"), POLLIN=select.POLLIN, select=select.select
        )
