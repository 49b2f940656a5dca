"""The fake upstreams of OpenAI's Responses API and Anthropic's Messages API, and a parser of
the event streams the gateway relays from them, for the tests of those APIs.

Each fake is a dataclass whose attributes set its behaviour, served by a Tornado handler on a
free port of 127.0.0.1 (serve_responses, serve_anthropic); stop_server closes it again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web

RESPONSES_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 19,
}
ANTHROPIC_MODEL = "claude-sonnet-4-5"
# The Anthropic fake's usage: a JSON reply's, and a stream's at message_start and message_delta.
ANTHROPIC_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 7,
    "cache_read_input_tokens": 100,
    "output_tokens": 12,
}
# At message_start, as Anthropic sends it: the output so far.
ANTHROPIC_START_USAGE = {**ANTHROPIC_USAGE, "output_tokens": 1}
ANTHROPIC_FINAL_OUTPUT = 9


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, parsed data) of each event of a Server-Sent Events body; a block that is
    not an event with JSON data fails the parse."""
    out = []
    for block in raw.decode().strip().split("\n\n"):
        name, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((name, json.loads("\n".join(data))))
    return out


async def stop_server(fake: RespFake | FakeAnthropic) -> None:
    """Stop a fake's server and close the connections it still holds."""
    assert fake.server is not None
    fake.server.stop()
    await fake.server.close_all_connections()


def _serve(fake: RespFake | FakeAnthropic, app: tornado.web.Application) -> None:
    sock, fake.port = tornado.testing.bind_unused_port("127.0.0.1")
    fake.server = tornado.httpserver.HTTPServer(app)
    fake.server.add_sockets([sock])


# ---------------------------------------------------------------- a fake Responses upstream


@dataclass
class RespFake:
    """Serves POST /v1/responses; each test sets its behaviour through the attributes."""

    port: int = 0
    server: tornado.httpserver.HTTPServer | None = None
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200  # non-200: an error body (echoing the Authorization header if echo_auth)
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(RESPONSES_USAGE))
    pieces: list[str] = field(default_factory=lambda: ["Hel", "lo", " wor", "ld"])
    raw_body: bytes | None = None  # a JSON reply to send exactly as given
    echo_auth: bool = False  # the reply's text (and the error's message) holds the key sent
    cut_after: int | None = None  # close the connection after this many events (or all)
    event_delay: float = 0.0  # seconds after each event sent
    linger: float = 0.0  # seconds between the closing event and the end of the body
    content_type: str = "text/event-stream"  # of a stream answer
    delay: float = 0.0  # before answering at all
    rewrite: Callable[[list[bytes]], list[bytes]] | None = None  # edits a stream's events
    finished: bool = False  # the last stream ran to its end
    left: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway hung up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def response_object(
    status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, model: str
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "resp_fake0123",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
    }
    if usage is not None or status != "completed":
        doc["usage"] = usage
    return doc


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {
        "type": "message",
        "id": "msg_fake0123",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def stream_events(pieces: list[str], usage: dict[str, Any] | None, model: str) -> list[bytes]:
    """The events of one streamed answer, in the shape and order OpenAI sends them."""
    text = "".join(pieces)
    seq = iter(range(10_000))
    at = {"output_index": 0, "item_id": "msg_fake0123"}

    def event(kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    started = response_object("in_progress", [], None, model)
    part = {"type": "output_text", "text": text, "annotations": []}
    empty = {**part, "text": ""}
    return [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item=message_item("", "in_progress")),
        event("response.content_part.added", **at, content_index=0, part=empty),
        *[
            event("response.output_text.delta", **at, content_index=0, delta=p, logprobs=[])
            for p in pieces
        ],
        event("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
        event("response.content_part.done", **at, content_index=0, part=part),
        event("response.output_item.done", output_index=0, item=message_item(text)),
        event(
            "response.completed",
            response=response_object("completed", [message_item(text)], usage, model),
        ),
    ]


class ResponsesHandler(tornado.web.RequestHandler):
    def initialize(self, fake: RespFake) -> None:
        self.fake = fake

    def on_connection_close(self) -> None:
        self.fake.left.set()

    async def post(self) -> None:
        fake = self.fake
        fake.requests.append((dict(self.request.headers), self.request.body))
        auth = self.request.headers.get("Authorization", "")
        if fake.delay:
            await asyncio.sleep(fake.delay)
        if fake.status != 200:
            self.set_status(fake.status)
            message = f"Incorrect API key provided: {auth}" if fake.echo_auth else "upstream no"
            self.finish({"error": {"message": message, "type": "invalid_request_error"}})
            return
        try:
            request = json.loads(self.request.body)
        except (ValueError, RecursionError):
            request = {}
        request = request if isinstance(request, dict) else {}
        model = str(request.get("model", "m"))
        pieces = list(fake.pieces)
        if fake.echo_auth:
            pieces = ["Your key is ", auth, " ok"]
        if request.get("stream") is not True:
            if fake.raw_body is not None:
                self.set_header("Content-Type", "application/json")
                self.finish(fake.raw_body)
                return
            doc = response_object("completed", [message_item("".join(pieces))], fake.usage, model)
            self.finish(doc)
            return
        self.set_header("Content-Type", fake.content_type)
        fake.finished = False
        events = stream_events(pieces, fake.usage, model)
        if fake.rewrite is not None:
            events = fake.rewrite(events)
        for n, event in enumerate(events):
            if fake.cut_after is not None and n == fake.cut_after:
                self.request.connection.stream.close()  # type: ignore[union-attr]
                return
            try:
                self.write(event)
                await self.flush()
            except tornado.iostream.StreamClosedError:
                fake.left.set()
                return
            if fake.event_delay:
                await asyncio.sleep(fake.event_delay)
            if fake.left.is_set():
                return
        if fake.linger:
            await asyncio.sleep(fake.linger)
        if fake.cut_after is not None:  # every event sent, then the connection dropped
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return
        fake.finished = True
        self.finish()


def serve_responses(fake: RespFake) -> RespFake:
    """Start a fake Responses upstream on a free port of 127.0.0.1, in the running loop."""
    _serve(fake, tornado.web.Application([(r"/v1/responses", ResponsesHandler, {"fake": fake})]))
    return fake


# ---------------------------------------------------------------- a fake Anthropic upstream


@dataclass
class FakeAnthropic:
    """Speaks Anthropic's Messages API; each test sets its behaviour through attributes.
    `{key}` in `pieces`, `message_id` or an error message is replaced by the x-api-key the
    fake received (an upstream that echoes its key)."""

    port: int = 0
    server: tornado.httpserver.HTTPServer | None = None
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    status: int = 200
    error_message: str = "invalid x-api-key: {key}"
    usage: dict[str, Any] = field(default_factory=lambda: dict(ANTHROPIC_USAGE))
    start_usage: dict[str, Any] = field(default_factory=lambda: dict(ANTHROPIC_START_USAGE))
    delta_usage: dict[str, Any] = field(
        default_factory=lambda: {"output_tokens": ANTHROPIC_FINAL_OUTPUT}
    )
    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    message_id: str = "msg_fake01"
    cut_after: int | None = None  # close the connection after this many stream events
    escape_key: bool = False  # write the echoed key with a JSON escape (\\u0073k-…)
    hang_up: bool = False  # close the connection instead of answering
    event_delay: float = 0.0
    input_tokens: int = 42  # count_tokens' answer
    stream_finished: bool = False
    client_left: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def texts(self, key: str) -> list[str]:
        return [p.replace("{key}", key) for p in self.pieces]

    def events(self, key: str, model: Any) -> list[tuple[str, dict[str, Any]]]:
        message = {
            "id": self.message_id.replace("{key}", key),
            "type": "message",
            "role": "assistant",
            "model": model if isinstance(model, str) else ANTHROPIC_MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.start_usage,
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for piece in self.texts(key):
            delta = {"type": "text_delta", "text": piece}
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": self.delta_usage,
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return events


class MessagesHandler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeAnthropic) -> None:
        self.fake = fake

    def dump(self, data: dict[str, Any]) -> str:
        text = json.dumps(data)
        key = self.request.headers.get("x-api-key", "")
        if self.fake.escape_key and key:
            text = text.replace(key, f"\\u{ord(key[0]):04x}{key[1:]}")
        return text

    def on_connection_close(self) -> None:
        self.fake.client_left.set()

    async def post(self, count: str | None) -> None:
        fake = self.fake
        headers = {k.lower(): v for k, v in self.request.headers.get_all()}
        try:
            request = json.loads(self.request.body)
        except ValueError:
            request = None
        fake.requests.append((self.request.path, headers, request))
        key = headers.get("x-api-key", "")
        if fake.hang_up:
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return
        if fake.status != 200:
            self.set_status(fake.status)
            message = fake.error_message.replace("{key}", key)
            self.finish(
                {"type": "error", "error": {"type": "authentication_error", "message": message}}
            )
            return
        if count:
            self.finish({"input_tokens": fake.input_tokens})
            return
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(request, dict) and request.get("stream") is True:
            await self._stream(fake.events(key, model))
            return
        self.set_header("Content-Type", "application/json")
        self.finish(
            self.dump(
                {
                    "id": fake.message_id.replace("{key}", key),
                    "type": "message",
                    "role": "assistant",
                    "model": model if isinstance(model, str) else ANTHROPIC_MODEL,
                    "content": [{"type": "text", "text": "".join(fake.texts(key))}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": fake.usage,
                }
            )
        )

    async def _stream(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        fake = self.fake
        self.set_header("Content-Type", "text/event-stream")
        await self.flush()  # the status line and headers go out before any event
        for n, (kind, data) in enumerate(events):
            if fake.cut_after is not None and n == fake.cut_after:
                self.request.connection.stream.close()  # type: ignore[union-attr]
                return
            try:
                self.write(f"event: {kind}\ndata: {self.dump(data)}\n\n")
                await self.flush()
            except tornado.iostream.StreamClosedError:
                fake.client_left.set()
                return
            if fake.event_delay:
                await asyncio.sleep(fake.event_delay)
            if fake.client_left.is_set():
                return
        fake.stream_finished = True
        self.finish()


def serve_anthropic(
    fake: FakeAnthropic, handler: type[MessagesHandler] | None = None
) -> FakeAnthropic:
    """Start a fake Anthropic upstream (served by `handler`, MessagesHandler or a subclass of
    it) on a free port of 127.0.0.1, in the running loop."""
    app = tornado.web.Application(
        [(r"/v1/messages(/count_tokens)?", handler or MessagesHandler, {"fake": fake})]
    )
    _serve(fake, app)
    return fake
