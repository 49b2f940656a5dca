"""Regressions from the attack review of the hardening: a client leaving mid-body leaves nothing
behind, strangers' bodies and log lines cost key holders nothing, odd Content-Lengths and forms
are a 400, streams and estimates charge what was used, the upstream key stays out of models, ids
and JSON escapes, and odd upstream text (lone surrogates, a BOM, UTF-16, NaN) cannot break an
answer or the dashboard. Real servers on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from conftest import ALICE_KEY, UPSTREAM_KEY, Client, Env, data_text
from test_admin_web import Browser
from test_hardening_streams import (
    call_lines,
    http_request,
    parse_http,
    port_of,
    raw_exchange,
    settled,
)

import gateway

ADMIN_KEY = "admin-CANARY-0123456789"
RICH_ALICE = {
    "alice": {"api_key": ALICE_KEY, "daily_request_limit": 100, "daily_token_limit": 10**9}
}
BEARER = {"Authorization": f"Bearer {ALICE_KEY}"}


# ---------------------------------------------------------------- fixtures and helpers


def request_head(method: str, path: str, length: int, **headers: str) -> bytes:
    """A request's line and headers (names with _ for -), announcing `length` body bytes."""
    fields = {"Host": "127.0.0.1", "Content-Length": str(length)}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode()


async def open_raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent `data` and stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_answer(
    reader: asyncio.StreamReader, timeout: float
) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-case headers, body by its Content-Length) from a stream."""

    async def read() -> tuple[int, dict[str, str], bytes]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                fields[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        return status, fields, body

    return await asyncio.wait_for(read(), timeout)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that carry a traceback or report an uncaught exception."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.exc_info or r.exc_text or "uncaught exception" in r.getMessage()
    ]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The access log's lines."""
    return [r.getMessage() for r in caplog.records if r.name == "tornado.access"]


@dataclass
class Answer:
    code: int
    body: bytes


class AdminSession:
    """The admin, logged in through the login form (with its XSRF token)."""

    def __init__(self, client: Client) -> None:
        self.browser = Browser(client)

    async def login(self) -> None:
        assert await self.browser.login(ADMIN_KEY) == 303

    async def request(self, path: str) -> Answer:
        code, text, _ = await self.browser.request(path)
        return Answer(code, text.encode())


async def post_json(client: Client, path: str, doc: Any) -> tornado.httpclient.HTTPResponse:
    """POST a JSON body with alice's key as a Bearer token (both routes accept it)."""
    return await client.http.fetch(
        client.base + path,
        method="POST",
        body=json.dumps(doc),
        headers={**BEARER, "X-API-Key": ALICE_KEY, "Content-Type": "application/json"},
        raise_error=False,
        request_timeout=30,
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def strict_json(body: bytes) -> Any:
    """Parse a body as strict JSON: UTF-8, no NaN or Infinity."""
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants)


# ---------------------------------------------------------------- a hostile upstream

CHAT_OK = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


class _HostileHandler(tornado.web.RequestHandler):
    """Misbehaves as the request's "model" says; remembers the keys it was sent."""

    def initialize(self, hostile: Hostile) -> None:
        self.hostile = hostile

    def _key(self) -> None:
        self.hostile.keys.add(self.request.headers.get("Authorization", "")[7:])

    def get(self) -> None:  # /v1/models: the key as a model id
        self._key()
        self.finish({"object": "list", "data": [{"id": UPSTREAM_KEY, "object": "model"}]})

    async def post(self) -> None:
        self._key()
        request = json.loads(self.request.body)
        mode, stream = request.get("model"), request.get("stream")
        key = UPSTREAM_KEY
        if mode == "surrogate-error":
            self.set_status(401)
            self.finish(b'{"error": {"message": "bad \\ud800 key", "type": "x"}}')
        elif mode in ("id-key", "id-key-drip", "surrogate-drip") and stream:
            ident = '"chatcmpl-\\ud800"' if mode == "surrogate-drip" else json.dumps(key)
            self.set_header("Content-Type", "text/event-stream")
            delta = '{"delta": {"role": "assistant", "content": "po"}, "index": 0}'
            self.write(f'data: {{"id": {ident}, "choices": [{delta}]}}\n\n')
            await self.flush()
            if mode != "id-key":  # drip: the client hangs up meanwhile
                await asyncio.sleep(1.0)
            done = '{"delta": {"content": "ng"}, "index": 0, "finish_reason": "stop"}'
            self.write(f'data: {{"id": {ident}, "choices": [{done}]}}\n\n')
            self.write(f'data: {{"id": {ident}, "choices": [], "usage": {json.dumps(USAGE)}}}\n\n')
            self.finish("data: [DONE]\n\n")
        elif mode == "id-key":
            self.finish({**CHAT_OK, "id": key, "usage": USAGE})
        elif mode in ("escaped-one", "escaped-all"):
            if mode == "escaped-one":
                written = key[:3] + f"\\u{ord(key[3]):04x}" + key[4:]
            else:
                written = "".join(f"\\u{ord(c):04x}" for c in key)
            reply = json.dumps({**CHAT_OK, "usage": USAGE}).replace("pong", f"pong {written}")
            self.set_header("Content-Type", "application/json")
            self.finish(reply.encode())
        elif mode in ("bom", "utf-16", "nan"):
            self.set_header("Content-Type", "application/json")
            text = json.dumps({**CHAT_OK, "usage": USAGE, "score": 0.5})
            if mode == "bom":
                self.finish(b"\xef\xbb\xbf" + text.encode())
            elif mode == "utf-16":
                self.finish(text.encode("utf-16"))
            else:
                self.finish(text.replace("0.5", "NaN").encode())
        else:
            self.finish({**CHAT_OK, "usage": USAGE})


@dataclass
class Hostile:
    port: int = 0
    keys: set[str] = field(default_factory=set)
    server: tornado.httpserver.HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    h = Hostile()
    app = tornado.web.Application([(r"/v1/.*", _HostileHandler, {"hostile": h})])
    sock, h.port = tornado.testing.bind_unused_port("127.0.0.1")
    h.server = tornado.httpserver.HTTPServer(app)
    h.server.add_sockets([sock])
    yield h
    h.server.stop()
    await h.server.close_all_connections()


# ---------------------------------------------------------------- F1. abandoned uploads


@pytest.mark.slow
async def test_clients_leaving_mid_body_leave_no_request_behind(env: Env) -> None:
    """600 uploads abandoned mid-body: no handler stays alive, no body memory stays held."""
    client = await env.start()
    service = env.gateways[0].service
    port = port_of(client)
    stranger = request_head("GET", "/api/status.php", 65536) + b"a" * 1000
    holder = request_head(
        "POST", "/api/call.php", 1_000_000, X_API_Key=ALICE_KEY, Content_Type="application/json"
    )
    holder += b'{"model": "m", "pad": "' + b"x" * (65536 - 23)
    for head in (stranger, holder):
        for _ in range(6):  # 300 of each, 50 at a time
            opened = await asyncio.gather(*(open_raw(port, head) for _ in range(50)))
            await asyncio.sleep(0.1)  # the gateway reads the headers and the part sent
            for _, writer in opened:
                writer.transport.abort()

    def alive() -> list[gateway.BaseHandler]:
        gc.collect()
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, gateway.BaseHandler) and o.service is service
        ]

    deadline = time.monotonic() + 5
    while (alive() or service.bodies.used) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    left = alive()
    assert len(left) == 0, Counter(type(o).__name__ for o in left)
    assert service.bodies.used == 0
    status, doc, _ = await client.call()
    assert status == 200, doc
    assert (await client.status())["status"] == "running"


# ---------------------------------------------------------------- F2. strangers' bodies


async def test_strangers_bodies_do_not_count_against_body_memory(env: Env) -> None:
    """10 strangers' uploads held open on admin login and status leave alice's call a 200."""
    client = await env.start(max_body_memory=200_000, max_body_size=100_000, admin_key=ADMIN_KEY)
    port = port_of(client)
    held = []
    for n in range(10):
        path, method = ("/admin/login", "POST") if n % 2 else ("/api/status.php", "GET")
        held.append(await open_raw(port, request_head(method, path, 65536)))
    await asyncio.sleep(0.2)
    # 20 KB: more than what three held 64 KiB bodies would leave of the 200,000 bytes.
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 20_000}]}
    status, doc, _ = await client.call(body)
    for _, writer in held:
        writer.transport.abort()
    assert status == 200, doc
    assert doc["success"] is True


async def test_a_route_without_a_body_answers_a_declared_one_413_at_once(senv: Env) -> None:
    """GET /api/status.php with Content-Length: 10 and no body byte: a JSON 413 at once."""
    client = await senv.start()
    reader, writer = await open_raw(port_of(client), request_head("GET", "/api/status.php", 10))
    try:
        status, head, body = await read_answer(reader, 2.0)
    except TimeoutError:
        raise AssertionError("no answer: the gateway waits for a body it never reads") from None
    finally:
        writer.transport.abort()
    assert status == 413, body
    assert head["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert (doc["success"], doc["message"]) == (False, "请求体过大")


# ---------------------------------------------------------------- F3. malformed input is a 400


async def test_content_lengths_that_are_not_plain_digits_are_a_json_400(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Content-Length ² (as Latin-1 or UTF-8 bytes) or of 5,000 digits: a JSON 400, no trace."""
    client = await senv.start()
    for value in (b"\xb2", b"\xc2\xb2", b"9" * 5000):
        data = (
            b"GET /api/status.php HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Length: " + value + b"\r\n\r\n"
        )
        status, head, body = parse_http(await raw_exchange(client, data, timeout=5))
        assert status == 400, (value[:10], body)
        assert head["content-type"].startswith("application/json")
        doc = json.loads(body)
        assert (doc["success"], doc["message"]) == (False, "请求参数错误")
    assert tracebacks(caplog) == []


async def test_a_multipart_form_without_a_boundary_is_no_500(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """POST /admin/login as multipart/form-data without a boundary: a JSON 400/403, no trace."""
    client = await senv.start(admin_key=ADMIN_KEY)
    data = (
        b"POST /admin/login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data\r\nContent-Length: 1\r\n\r\nx"
    )
    status, head, body = parse_http(await raw_exchange(client, data, timeout=5))
    assert status in (400, 403), body
    assert head["content-type"].startswith("application/json")
    assert json.loads(body)["success"] is False
    assert tracebacks(caplog) == []


# ---------------------------------------------------------------- F4. strangers' log lines


@pytest.mark.slow
async def test_strangers_status_requests_are_rate_limited_in_the_access_log(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """2,500 keyless GET /api/status.php write at most 25 access lines; the admin's polls all."""
    caplog.set_level(logging.INFO, logger="tornado.access")
    client = await senv.start(admin_key=ADMIN_KEY)
    head = request_head("GET", "/api/status.php", 0)

    async def poll() -> Counter[int]:
        """100 requests pipelined on one keep-alive connection."""
        reader, writer = await open_raw(port_of(client), head * 100)
        try:
            return Counter([(await read_answer(reader, 10.0))[0] for _ in range(100)])
        finally:
            writer.transport.abort()

    answers = await asyncio.gather(*(poll() for _ in range(25)))
    assert sum(answers, Counter()) == {200: 2500}
    lines = access_lines(caplog)
    assert len(lines) <= 25, (len(lines), lines[:3])
    # A logged-in admin's dashboard polling is not a stranger's: every poll is logged.
    admin = AdminSession(client)
    await admin.login()
    caplog.clear()
    for _ in range(30):
        assert (await admin.request("/admin/api/state")).code == 200
    polls = [line for line in access_lines(caplog) if "GET /admin/api/state" in line]
    assert len(polls) == 30


@pytest.mark.slow
async def test_strangers_refusals_are_rate_limited_in_the_access_log(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """500 refusals of keyless uploads (503s before the fix) write at most 25 access lines."""
    caplog.set_level(logging.INFO, logger="tornado.access")
    client = await senv.start(max_body_memory=200_000, max_body_size=100_000)
    port = port_of(client)
    head = request_head("GET", "/api/status.php", 65536)
    # Before the fix these held uploads filled --max-body-memory and every later one was a 503.
    held = [await open_raw(port, head) for _ in range(10)]
    await asyncio.sleep(0.2)
    statuses: Counter[int] = Counter()
    for _ in range(500):
        reader, writer = await open_raw(port, head)
        try:
            status, _, body = await read_answer(reader, 2.0)
        finally:
            writer.transport.abort()
        assert json.loads(body)["success"] is False
        statuses[status] += 1
    for _, writer in held:
        writer.transport.abort()
    assert all(status >= 400 for status in statuses), statuses
    lines = access_lines(caplog)
    assert len(lines) <= 25, (len(lines), statuses, lines[:3])


# ---------------------------------------------------------------- F6. what a call is charged


async def test_a_client_leaving_after_the_finish_reason_is_charged_the_upstream_usage(
    env: Env,
) -> None:
    """Hanging up after the finish_reason chunk, before the usage chunk: charged 10,000."""
    env.upstream.usage = {"prompt_tokens": 5000, "completion_tokens": 5000, "total_tokens": 10000}
    env.upstream.pieces = ["Hel", "lo"]
    env.upstream.stream_delay = 0.5  # the usage chunk comes after the client has left
    client = await env.start()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    request = http_request("/v1/chat/completions", json.dumps(body).encode(), BEARER)
    raw = await raw_exchange(client, request, stop_at=b'"finish_reason": "stop"')
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    await settled(env)
    figures = (await client.status())["stats"]
    assert (figures["today_requests"], figures["today_tokens"]) == (1, 10000)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"f{i}",
            "description": "word " * 4000,  # 20 KB each, 200 KB in all
            "parameters": {"type": "object", "properties": {}},
        },
    }
    for i in range(10)
]


async def test_estimates_count_the_text_of_tools(env: Env) -> None:
    """Without upstream usage, 200 KB of tool descriptions are >= 40,000 prompt tokens."""
    env.write_users(RICH_ALICE)
    env.upstream.usage = None
    client = await env.start()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    assert gateway.estimate_request_tokens(chat) >= 40_000
    status, doc, _ = await client.call(chat)
    assert status == 200, doc
    assert doc["data"]["usage"]["estimated"] is True
    assert doc["data"]["usage"]["prompt_tokens"] >= 40_000


async def test_estimates_count_token_ids(env: Env) -> None:
    """Without upstream usage, a /v1/completions prompt of 5,000 token ids is >= 5,000."""
    env.write_users(RICH_ALICE)
    env.upstream.usage = None
    client = await env.start()
    completion = {"model": "m", "prompt": list(range(5000))}
    assert gateway.estimate_request_tokens(completion) >= 5000
    resp = await post_json(client, "/v1/completions", completion)
    assert resp.code == 200, resp.body[:300]
    await settled(env)
    (line,) = call_lines(env)
    assert (line["endpoint"], line["estimated"]) == ("/v1/completions", True)
    assert line["prompt_tokens"] >= 5000
    assert (await client.status())["stats"]["today_tokens"] >= 5000


@pytest.mark.slow
async def test_padding_cannot_make_a_large_prompt_cheap(env: Env) -> None:
    """100,000 empty lists around a 2 MB message: still >= 250,000 prompt tokens charged."""
    env.write_users(RICH_ALICE)
    env.upstream.usage = None
    client = await env.start()
    padding: list[list[Any]] = [[]] * 100_000
    request = {
        "model": "m",
        "messages": [
            {"role": "user", "content": padding},
            {"role": "user", "content": "y " * 1_000_000, "pad": padding},
        ],
    }
    status, doc, _ = await client.call(request)
    assert status == 200, doc
    assert doc["data"]["usage"]["prompt_tokens"] >= 250_000
    size = len(json.dumps(request).encode())
    assert gateway.estimate_request_tokens(request, size) >= 250_000
    reply = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
    assert gateway.usage_of(reply, request, size).prompt_tokens >= 250_000


# ---------------------------------------------------------------- F7. the upstream key


async def test_the_model_list_never_carries_the_upstream_key(env: Env, hostile: Hostile) -> None:
    """An upstream listing its key as a model id: GET /v1/models shows no key."""
    client = await env.start(upstream_base_url=hostile.url)
    resp = await client.http.fetch(client.base + "/v1/models", headers=BEARER, raise_error=False)
    assert resp.code == 200, resp.body[:300]
    assert hostile.keys == {UPSTREAM_KEY}
    assert UPSTREAM_KEY not in resp.body.decode("utf-8", "replace")
    assert UPSTREAM_KEY not in json.dumps(json.loads(resp.body), ensure_ascii=False)


async def test_upstream_ids_never_carry_the_key_to_the_call_log_or_dashboard(
    env: Env, hostile: Hostile
) -> None:
    """The key as the upstream's id (replies, stream chunks): not in data/ nor the dashboard."""
    client = await env.start(upstream_base_url=hostile.url, admin_key=ADMIN_KEY)
    seen = []
    for path in ("/api/call.php", "/v1/chat/completions"):
        resp = await post_json(client, path, {"model": "id-key", "messages": [{"role": "user"}]})
        assert resp.code == 200, resp.body[:300]
        seen.append(resp.body)
    for mode, stop_at in (("id-key", None), ("id-key-drip", b"data: ")):
        body = {"model": mode, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        request = http_request("/v1/chat/completions", json.dumps(body).encode(), BEARER)
        seen.append(await raw_exchange(client, request, stop_at=stop_at))
        await settled(env)
    assert hostile.keys == {UPSTREAM_KEY}
    statuses = sorted(line["status"] for line in call_lines(env))
    assert statuses == [200, 200, 200, 499]
    state = await admin_state(client)
    assert len(state["data"]["failures"]) == 1  # the 499
    texts = [b.decode("utf-8", "replace") for b in seen]
    for text in [*texts, data_text(env.data_dir), json.dumps(state, ensure_ascii=False)]:
        assert UPSTREAM_KEY not in text


@pytest.mark.parametrize("path", ["/api/call.php", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", ["escaped-one", "escaped-all"])
async def test_a_key_written_in_json_escapes_is_redacted(
    env: Env, hostile: Hostile, mode: str, path: str
) -> None:
    """A 200 reply holding the key in JSON escapes (one character, or all): the client's
    decoded JSON holds no key."""
    client = await env.start(upstream_base_url=hostile.url)
    resp = await post_json(client, path, {"model": mode, "messages": [{"role": "user"}]})
    assert resp.code == 200, resp.body[:300]
    assert hostile.keys == {UPSTREAM_KEY}
    decoded = json.dumps(strict_json(resp.body), ensure_ascii=False)
    assert UPSTREAM_KEY not in decoded
    assert "[redacted]" in decoded


# ---------------------------------------------------------------- F8. lone surrogates


async def admin_state(client: Client) -> Any:
    """/admin/api/state after a login: it answers 200, in strict JSON."""
    admin = AdminSession(client)
    await admin.login()
    state = await admin.request("/admin/api/state")
    assert state.code == 200, state.body[:300]
    return strict_json(state.body)


async def test_a_lone_surrogate_in_an_upstream_error_gives_well_formed_502s(
    env: Env, hostile: Hostile
) -> None:
    """An upstream error message with a lone surrogate escape: a well-formed JSON 502 on
    /api/call.php, /v1/chat/completions and a stream; the dashboard still answers."""
    client = await env.start(upstream_base_url=hostile.url, admin_key=ADMIN_KEY)
    request = {"model": "surrogate-error", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in (
        ("/api/call.php", request),
        ("/v1/chat/completions", request),
        ("/v1/chat/completions", {**request, "stream": True}),
    ):
        resp = await post_json(client, path, body)
        assert resp.code == 502, (path, body, resp.code, resp.body[:300])
        assert resp.headers["Content-Type"].startswith("application/json")
        doc = strict_json(resp.body)
        assert ("error" in doc) if path.startswith("/v1/") else (doc["success"] is False)
    await settled(env)
    assert [line["status"] for line in call_lines(env)] == [502, 502, 502]
    assert len((await admin_state(client))["data"]["failures"]) == 3


async def test_a_lone_surrogate_in_a_stream_id_leaves_the_dashboard_working(
    env: Env, hostile: Hostile
) -> None:
    """A stream whose id holds a lone surrogate, left by its client (a 499 line): the
    dashboard's state still answers 200 in strict JSON."""
    client = await env.start(upstream_base_url=hostile.url, admin_key=ADMIN_KEY)
    body = {"model": "surrogate-drip", "stream": True, "messages": [{"role": "user"}]}
    data = http_request("/v1/chat/completions", json.dumps(body).encode(), BEARER)
    assert (await raw_exchange(client, data, stop_at=b"data: ")).startswith(b"HTTP/1.1 200")
    await settled(env)
    assert [line["status"] for line in call_lines(env)] == [499]
    assert len((await admin_state(client))["data"]["failures"]) == 1


# ---------------------------------------------------------------- F9. odd but parseable replies


@pytest.mark.parametrize("mode", ["bom", "utf-16", "nan"])
async def test_odd_upstream_json_reaches_the_client_as_strict_json(
    env: Env, hostile: Hostile, mode: str
) -> None:
    """A 200 reply with a BOM, in UTF-16 or with NaN: both routes answer strict JSON."""
    client = await env.start(upstream_base_url=hostile.url)
    request = {"model": mode, "messages": [{"role": "user", "content": "hi"}]}
    resp = await post_json(client, "/api/call.php", request)
    assert resp.code == 200, resp.body[:300]
    doc = strict_json(resp.body)
    assert doc["success"] is True
    assert doc["data"]["response"]["choices"][0]["message"]["content"] == "pong"
    resp = await post_json(client, "/v1/chat/completions", request)
    assert resp.code == 200, resp.body[:300]
    assert strict_json(resp.body)["choices"][0]["message"]["content"] == "pong"


# ---------------------------------------------------------------- F11. a total below its parts


async def test_a_usage_total_below_its_parts_is_not_believed(env: Env) -> None:
    """Usage 5,000 + 5,000 with total_tokens 0 is charged 10,000."""
    usage = {"prompt_tokens": 5000, "completion_tokens": 5000, "total_tokens": 0}
    assert gateway.usage_of({"usage": usage}, {}).total_tokens == 10000
    env.upstream.usage = usage
    client = await env.start()
    status, doc, _ = await client.call()
    assert status == 200, doc
    assert doc["data"]["usage"]["total_tokens"] == 10000
    assert (await client.status())["stats"]["today_tokens"] == 10000
