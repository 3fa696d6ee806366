"""A small OpenAI-compatible server on 127.0.0.1 for the tests and the benchmark.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer
`POST /v1/chat/completions`, with a delay and a failure mode the caller picks.
Run it on its own for the benchmark: `python tests/fake_openai.py --port 9100 --delay 1`.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field

# Behaviours a test can script, one per upstream call, before the server falls back to "ok".
OK = "ok"
DROP = "drop"  # close the connection without answering
NOT_JSON = "not_json"  # 200 whose body is not JSON
EMPTY_CHOICES = "empty_choices"  # 200 with "choices": []
HANG = "hang"  # never answer, so the client times out
CLOSE = "close"  # answer, then close the connection, as a server whose keep-alive timeout ran out
TRICKLE = "trickle"  # answer at once, but send the body a few bytes at a time over TRICKLE_SECONDS
TRICKLE_SECONDS = 3.0
HOLD = "hold"  # wait for release() (counted in flight meanwhile), then answer as "ok"

# A prompt containing "FAIL:<status>" is answered with that status whatever the script says, so a test of
# concurrent calls can pick the failing one by its content rather than by call order.
FAIL_MARKER = re.compile(r"FAIL:(\d{3})")


@dataclass
class Stream:
    """How to answer a streamed call ("stream": true): the echo text a word a chunk, then finish, usage, [DONE].

    Positions count the text chunks from 0. At `hold_at` the server waits for release() (or for the client to go);
    at `silent_at` it is silent for `silence` seconds; at `cut_at` it drops the connection mid-body; at `error_at`
    it sends an error object and ends the body. `gap` is the pause before every chunk. With `end_held`, the end of
    the body (after [DONE]) waits for release() (or for the client to go).
    """

    hold_at: int | None = None
    silent_at: int | None = None
    silence: float = 3600.0
    cut_at: int | None = None
    error_at: int | None = None
    usage: bool = True  # send the usage chunk when the request asks for it
    finish: bool = True  # send the finish_reason chunk and data: [DONE]
    gap: float = 0.0
    usage_counts: dict | None = None  # the usage chunk's counts, instead of the true ones
    request_id: str | None = None  # the x-request-id header, instead of req_fake_<n>; "" sends none
    end_held: bool = False


@dataclass
class Status:
    """Answer with this HTTP status and an OpenAI-shaped error body."""

    code: int
    message: str = "upstream says no"
    headers: dict = field(default_factory=dict)
    type: str = "invalid_request_error"  # OpenAI's type for a request it refuses


def completion_body(request_body: dict, request_id: int) -> dict:
    """The chat completion this server answers with: it echoes the last message back."""
    messages = request_body.get("messages") or [{"content": ""}]
    text = f"echo: {messages[-1].get('content', '')}"
    words = text.split()
    max_tokens = request_body.get("max_tokens") or len(words)
    finish_reason = "length" if len(words) > max_tokens else "stop"
    text = " ".join(words[:max_tokens])
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion_tokens = len(text.split())
    return {
        "id": f"chatcmpl-fake-{request_id}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": request_body.get("model", "fake-model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class Raw(bytes):
    """A whole HTTP answer, head and body, sent as it is; the connection is closed after it."""


class ClosingAnswer(bytes):
    """An answer after which the server closes the connection, without saying so in a header."""


@dataclass
class StreamedAnswer:
    """A streamed answer to send: the script, and the request it answers."""

    script: Stream
    request_body: dict
    request_id: int


class TrickledAnswer(bytes):
    """An answer whose body comes a few bytes at a time, each piece in time for a per-read timeout."""


def http_response(status: int, body: bytes, headers: dict | None = None, content_type="application/json") -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class FakeOpenAI:
    """The server, with a script of behaviours and a record of what it was sent."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.script: list = []  # behaviours for the next calls, consumed in order
        self.calls = 0
        self.connections = 0  # connections accepted
        self.requests: list[dict] = []  # headers and body of each chat call, newest last
        self.record = True
        self.in_flight = 0  # chat calls waiting out the delay right now
        self.max_in_flight = 0  # the most at once since the last reset
        self._in_flight_changed = threading.Condition()
        self.closed_connections = 0  # connections opened since the last reset that this server closed, or saw closed
        self._generation = 0  # bumped by reset(): a connection of an earlier test that closes later is not counted
        self._connection_closed = threading.Condition()
        self.streams_abandoned = 0  # streams whose client closed the connection before their end
        self._stream_abandoned = threading.Condition()
        self._release: asyncio.Event | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    # -- what tests use --------------------------------------------------------
    def then(self, *behaviours) -> "FakeOpenAI":
        """Script the next upstream calls, one behaviour each."""
        self.script.extend(behaviours)
        return self

    def reset(self) -> None:
        self.script.clear()
        self.requests.clear()
        self.calls = 0
        self.connections = 0
        self._generation += 1
        self.closed_connections = 0
        self.streams_abandoned = 0
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.clear)
        self.delay = 0.0
        self.max_in_flight = 0

    def wait_for_in_flight(self, count: int, timeout: float = 30) -> bool:
        """Block until at least `count` chat calls are in flight at once; False if that does not happen in time."""
        with self._in_flight_changed:
            return self._in_flight_changed.wait_for(lambda: self.in_flight >= count, timeout)

    def wait_for_closed_connections(self, count: int, timeout: float = 30) -> bool:
        """Block until this server has closed (or seen closed) at least `count` connections since the last reset."""
        with self._connection_closed:
            return self._connection_closed.wait_for(lambda: self.closed_connections >= count, timeout)

    def release(self) -> None:
        """Let every call held by HOLD, and every stream held at `hold_at`, go on (until hold_again())."""
        self._loop.call_soon_threadsafe(self._release.set)

    def hold_again(self) -> None:
        """After release(): the next HOLD and `hold_at` wait again; returns once that is in force."""
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (self._release.clear(), done.set()))
        done.wait(10)

    def wait_for_abandoned_streams(self, count: int, timeout: float = 30) -> bool:
        """Block until the client side has closed at least `count` streams before their end."""
        with self._stream_abandoned:
            return self._stream_abandoned.wait_for(lambda: self.streams_abandoned >= count, timeout)

    def _count_in_flight(self, change: int) -> None:
        with self._in_flight_changed:
            self.in_flight += change
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._in_flight_changed.notify_all()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- the server ------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        generation = self._generation
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                method, path, _ = request_line.split(" ", 2)
                if method == "POST" and path.endswith("/chat/completions"):
                    answer = await self._chat(headers, body)
                    if isinstance(answer, StreamedAnswer):
                        if not await self._stream(answer, reader, writer):
                            break
                        continue
                elif path.endswith("/healthz"):
                    answer = http_response(200, b'{"status":"ok"}')
                else:
                    answer = http_response(404, b'{"error":{"message":"no such route"}}')
                if answer is None:  # DROP
                    break
                if isinstance(answer, TrickledAnswer):
                    await self._trickle(answer, writer)
                else:
                    writer.write(answer)
                    await writer.drain()
                if isinstance(answer, ClosingAnswer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):  # the client may have gone first
                await writer.wait_closed()
            with self._connection_closed:
                # An earlier test's idle connection, closed when its client is collected, would otherwise count
                # here and end a wait before this test's own connection is closed.
                if generation == self._generation:
                    self.closed_connections += 1
                    self._connection_closed.notify_all()

    async def _chat(self, headers: dict, body: bytes) -> bytes | None:
        self.calls += 1
        request_id = next(self._ids)
        behaviour = self.script.pop(0) if self.script else OK
        try:
            request_body = json.loads(body)
        except ValueError:
            request_body = {}
        if self.record:
            self.requests.append({"headers": headers, "body": request_body})
        marker = FAIL_MARKER.search(json.dumps(request_body.get("messages", [])))
        if marker:
            behaviour = Status(int(marker.group(1)))
        if behaviour == HANG:
            await asyncio.sleep(3600)
        if behaviour == HOLD:
            self._count_in_flight(+1)
            try:
                await self._release.wait()
            finally:
                self._count_in_flight(-1)
        if self.delay:
            await self._wait(self.delay)
        if behaviour == DROP:
            return None
        if isinstance(behaviour, Raw):
            return ClosingAnswer(behaviour)
        if behaviour == NOT_JSON:
            return http_response(200, b"<html>oops</html>", content_type="application/json")
        ids = {"x-request-id": f"req_fake_{request_id}"}
        if behaviour == EMPTY_CHOICES:
            payload = completion_body(request_body, request_id) | {"choices": []}
            return http_response(200, json.dumps(payload).encode(), ids)
        if isinstance(behaviour, Status):
            error = {"error": {"message": behaviour.message, "type": behaviour.type, "param": None, "code": None}}
            return http_response(behaviour.code, json.dumps(error).encode(), ids | behaviour.headers)
        if request_body.get("stream") is True:
            return StreamedAnswer(behaviour if isinstance(behaviour, Stream) else Stream(), request_body, request_id)
        answer = http_response(200, json.dumps(completion_body(request_body, request_id)).encode(), ids)
        if behaviour == TRICKLE:
            return TrickledAnswer(answer)
        return ClosingAnswer(answer) if behaviour == CLOSE else answer

    async def _stream(self, answer: "StreamedAnswer", reader, writer) -> bool:
        """Send a streamed answer as OpenAI does; False when the connection must close after it."""
        script, request_body = answer.script, answer.request_body
        request_id = f"req_fake_{answer.request_id}" if script.request_id is None else script.request_id
        request_id_header = f"x-request-id: {request_id}\r\n" if request_id else ""
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            f"{request_id_header}\r\n".encode()
        )
        await writer.drain()
        completion = completion_body(request_body, answer.request_id)
        head = {"id": completion["id"], "object": "chat.completion.chunk", "created": 1700000000,
                "model": completion["model"]}
        words = completion["choices"][0]["message"]["content"].split(" ")
        include_usage = (request_body.get("stream_options") or {}).get("include_usage") is True
        client_gone = asyncio.ensure_future(reader.read(1))  # b"" when the client closes the connection

        async def send(event: dict | str) -> None:
            data = event if isinstance(event, str) else json.dumps(head | event)
            payload = f"data: {data}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            await writer.drain()

        async def wait(awaitable) -> bool:
            """Wait for `awaitable`, or for the client to go; True if the client went."""
            task = asyncio.ensure_future(awaitable)
            await asyncio.wait([task, client_gone], return_when=asyncio.FIRST_COMPLETED)
            if client_gone.done():
                task.cancel()
                return True
            return False

        try:
            for position, word in enumerate(words):
                if script.gap and await wait(asyncio.sleep(script.gap)):
                    return self._abandoned()
                if position == script.hold_at and await wait(self._release.wait()):
                    return self._abandoned()
                if position == script.silent_at and await wait(asyncio.sleep(script.silence)):
                    return self._abandoned()
                if position == script.cut_at:
                    writer.write(b"ff\r\ndata: {\"choices\"")  # half a chunk, then the connection drops
                    return False
                if position == script.error_at:
                    await send(json.dumps({"error": {"message": "the model crashed", "type": "server_error"}}))
                    break
                text = word if position == 0 else " " + word
                await send({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            else:
                if script.finish:
                    finish_reason = completion["choices"][0]["finish_reason"]
                    await send({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
                if script.usage and include_usage:
                    await send({"choices": [], "usage": script.usage_counts or completion["usage"]})
                if script.finish:
                    await send("[DONE]")
                if script.end_held and await wait(self._release.wait()):
                    return self._abandoned()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        except ConnectionError:
            return self._abandoned()
        finally:
            client_gone.cancel()  # and wait until it is: the next request's read must be the only one waiting
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await client_gone

    def _abandoned(self) -> bool:
        with self._stream_abandoned:
            self.streams_abandoned += 1
            self._stream_abandoned.notify_all()
        return False

    @staticmethod
    async def _trickle(answer: bytes, writer: asyncio.StreamWriter, pieces: int = 10) -> None:
        head_end = answer.index(b"\r\n\r\n") + 4
        writer.write(answer[:head_end])
        body = answer[head_end:]
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            await asyncio.sleep(TRICKLE_SECONDS / pieces)
            writer.write(body[start : start + size])
            await writer.drain()

    async def _wait(self, seconds: float) -> None:
        """Wait out the delay, counting the calls that wait at once (a HANG never gets here, so never counts)."""
        self._count_in_flight(+1)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._count_in_flight(-1)


    async def _serve(self, port: int, started: threading.Event | None) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=4096)
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        if started:
            started.set()
        async with server:
            await server.serve_forever()

    def start_in_thread(self) -> "FakeOpenAI":
        """Serve on a free port from a daemon thread; returns once it is listening."""
        started = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(0, started),), daemon=True).start()
        # Generous, for a busy machine; a server that never listens is a failure, not a test that hangs later.
        if not started.wait(60):
            raise RuntimeError("the fake OpenAI server did not start listening within 60 s")
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    fake = FakeOpenAI(delay=args.delay)
    fake.record = False  # a long benchmark must not grow memory
    print(f"fake OpenAI on 127.0.0.1:{args.port}, delay {args.delay}s", flush=True)
    asyncio.run(fake._serve(args.port, None))


if __name__ == "__main__":
    main()
