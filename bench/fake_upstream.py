"""A fast fake OpenAI-compatible upstream for benchmarks: plain asyncio, HTTP/1.1 keep-alive.

POST .../chat/completions answers a chat completion with usage, or with "stream": true an SSE
stream (--chunks events --chunk-delay apart, a usage chunk when asked, then [DONE]).
GET .../models lists one model. GET /stats counts the chat completions answered so far.
Anything else is a 404.

    python bench/fake_upstream.py --port 9101 [--delay 0.05] [--chunks 5] [--chunk-delay 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "pong"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
).encode()
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
ANSWERED = [0]  # chat completions answered (GET /stats)


def _chunk(payload: bytes) -> bytes:
    """One HTTP chunk carrying one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _stream_chunks(n: int, include_usage: bool) -> list[bytes]:
    out = []
    for i in range(n):
        choice = {
            "index": 0,
            "delta": {"content": "tok "},
            "finish_reason": "stop" if i == n - 1 else None,
        }
        out.append(
            _chunk(
                json.dumps(
                    {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
                ).encode()
            )
        )
    if include_usage:
        usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
        out.append(_chunk(json.dumps({"id": "c", "choices": [], "usage": usage}).encode()))
    out.append(_chunk(b"[DONE]"))
    out.append(b"0\r\n\r\n")
    return out


class Upstream(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            task = asyncio.ensure_future(self.answer(method, path, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def answer(self, method: str, path: str, body: bytes) -> None:
        if self.args.delay:
            await asyncio.sleep(self.args.delay)
        t = self.transport
        if t is None or t.is_closing():
            return
        if method == "GET" and path.endswith("/models"):
            self.respond(200, MODELS)
        elif method == "GET" and path == "/stats":
            self.respond(200, json.dumps({"chat": ANSWERED[0]}).encode())
        elif method == "POST" and path.endswith("/chat/completions"):
            ANSWERED[0] += 1
            request = json.loads(body)
            if request.get("stream"):
                include = bool((request.get("stream_options") or {}).get("include_usage"))
                await self.stream(include)
            else:
                self.respond(200, REPLY)
        else:
            self.respond(404, b'{"error":{"message":"not found"}}')

    def respond(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )

    async def stream(self, include_usage: bool) -> None:
        t = self.transport
        assert t is not None
        t.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = _stream_chunks(self.args.chunks, include_usage)
        if not self.args.chunk_delay:
            t.write(b"".join(chunks))
            return
        for piece in chunks:
            if t.is_closing():
                return
            t.write(piece)
            await asyncio.sleep(self.args.chunk_delay)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--chunks", type=int, default=5, help="content events per stream")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream events")
    args = p.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(args), "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
