"""The benchmark's streaming model server: OpenAI-compatible server-sent events at a steady pace, on 127.0.0.1.

    python bench/stream_upstream.py --port 9200 --chunks 50 --interval 0.05

`POST /v1/chat/completions` with `"stream": true` answers as OpenAI streams: a first chunk with the role, then
`--chunks` chunks of one word each, one every `--interval` seconds (50 at 20 tokens/s by default), a last chunk
with the finish_reason, the usage chunk when `stream_options.include_usage` asks for it, and `data: [DONE]`; the
connection stays open for the next call. A request whose last message contains `[silent]` gets the headers of a
stream and then nothing, until the client hangs up: a model server that is thinking. Without `"stream": true` the
completion comes back at once. `GET /stats` counts what it served; `GET /healthz` answers 200.

One asyncio loop and one timer per chunk: it holds a thousand streams in a few percent of one core, so that the
benchmark measures the service, not its model server.
"""

import argparse
import asyncio
import contextlib
import json

SILENT_MARKER = "[silent]"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nx-request-id: req_bench_stream\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def http_chunk(data: bytes) -> bytes:
    """One piece of a chunked HTTP body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return http_chunk(f"data: {text}\n\n".encode())


def http_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class StreamUpstream:
    """The server and its counters."""

    def __init__(self, chunks: int, interval: float):
        self.words, self.interval = chunks, interval
        self.stats = {"streams_started": 0, "streams_completed": 0, "chunks_sent": 0, "streams_open": 0,
                      "silent_open": 0, "silent_closed_by_client": 0, "completions": 0}  # fmt: skip
        self._frames: dict[tuple[str, bool], tuple[bytes, list[bytes], bytes, int]] = {}

    def frames(self, model: str, include_usage: bool) -> tuple[bytes, list[bytes], bytes, int]:
        """(role chunk, word chunks, the end: finish, usage, [DONE]; chunks in all), built once per model and usage."""
        key = (model, include_usage)
        if key not in self._frames:
            usage = {"usage": None} if include_usage else {}

            def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                            "model": model, "system_fingerprint": "fp_bench", "choices": [choice]} | usage)  # fmt: skip

            words = [chunk({"content": f" word{i}"}) for i in range(self.words)]
            end = [chunk({}, "stop")]
            if include_usage:
                counts = {"prompt_tokens": 8, "completion_tokens": self.words, "total_tokens": 8 + self.words}
                end.append(sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                                "model": model, "system_fingerprint": "fp_bench", "choices": [], "usage": counts}))  # fmt: skip
            self._frames[key] = (chunk({"role": "assistant", "content": ""}), words,
                                 b"".join(end) + sse("[DONE]") + LAST_CHUNK, 1 + len(words) + len(end))  # fmt: skip
        return self._frames[key]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in header_lines
                               if line.lower().startswith("content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                method, path, _ = request_line.split(" ", 2)
                if method == "POST" and path.endswith("/chat/completions"):
                    if not await self.chat(json.loads(body or b"{}"), reader, writer):
                        break
                elif path.endswith("/stats"):
                    writer.write(http_response(200, json.dumps(self.stats).encode()))
                elif path.endswith("/healthz"):
                    writer.write(http_response(200, b'{"status":"ok"}'))
                else:
                    writer.write(http_response(404, b'{"error":{"message":"no such route"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def chat(self, request: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one call; False when the connection is done for."""
        model = request.get("model") or "fake-model"
        if not request.get("stream"):
            self.stats["completions"] += 1
            text = " ".join(f"word{i}" for i in range(self.words))
            answer = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 8, "completion_tokens": self.words, "total_tokens": 8 + self.words}}  # fmt: skip
            writer.write(http_response(200, json.dumps(answer).encode()))
            return True
        messages = request.get("messages") or [{}]
        if SILENT_MARKER in str(messages[-1].get("content", "")):
            return await self.silent(reader, writer)
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        role, words, end, count = self.frames(model, include_usage)
        self.stats["streams_started"] += 1
        self.stats["streams_open"] += 1
        try:
            loop = asyncio.get_running_loop()
            writer.write(STREAM_HEAD + role)
            started = loop.time()
            for number, word in enumerate(words, 1):
                # Each chunk at its own time from the start, so that a late wake-up never delays the next ones.
                await asyncio.sleep(started + number * self.interval - loop.time())
                if writer.is_closing():
                    return False
                writer.write(word)
                self.stats["chunks_sent"] += 1
            writer.write(end)
            await writer.drain()
            self.stats["chunks_sent"] += count - len(words)
            self.stats["streams_completed"] += 1
            return True
        finally:
            self.stats["streams_open"] -= 1

    async def silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """The headers of a stream, then nothing until the client closes the connection."""
        self.stats["silent_open"] += 1
        try:
            writer.write(STREAM_HEAD)
            await writer.drain()
            while await reader.read(4096):  # a client sends nothing more on a connection whose answer is not done
                pass
            self.stats["silent_closed_by_client"] += 1
            return False
        finally:
            self.stats["silent_open"] -= 1


async def serve(port: int, chunks: int, interval: float) -> None:
    upstream = StreamUpstream(chunks, interval)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--chunks", type=int, default=50, help="words per stream, one chunk each")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between two chunks")
    args = parser.parse_args()
    print(f"streaming upstream on 127.0.0.1:{args.port}: {args.chunks} chunks every {args.interval:g} s", flush=True)
    asyncio.run(serve(args.port, args.chunks, args.interval))


if __name__ == "__main__":
    main()
