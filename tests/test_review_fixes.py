"""The fixes of an attacker's review, beyond routing (tests/test_routing.py has those): each
test here fails on the behaviour before the fix.

count_tokens bodies stay counted while queued and obey the models list; idle workers hold no
job; holds and strict caps count n answers; allow_ips behind --xheaders reads the proxy's
X-Forwarded-For entry; one model-list fetch at a time; impossible dates and unreadable files
are config errors; deep error bodies fail over; a stream that goes on after its end is cut;
404s in each API's shape; the upstream's configured headers win; a Responses stream whose
client leaves after the text is charged the usage that follows.

Real servers on 127.0.0.1: the gateway in process, small fake upstreams beside it."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web
from conftest import ALICE_KEY, BOB_KEY, UPSTREAM_KEY, Client, Env
from fakes import ANTHROPIC_MODEL as MODEL
from fakes import RESPONSES_USAGE as USAGE
from fakes import (
    FakeAnthropic,
    MessagesHandler,
    RespFake,
    serve_anthropic,
    serve_responses,
    stop_server,
)
from test_anthropic_api import MSGS, TEAM_KEY, assert_anthropic_error
from test_responses_api import PROMPT, PROMPT_ESTIMATE, open_stream
from test_routing import K1, K2, Fake, up, write_yaml
from test_routing import serve as serve_routing_fake

import gateway

BIG = {"daily_request_limit": 100_000, "daily_token_limit": 10**9}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "ping"}]}


# ---------------------------------------------------------------- servers


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., int]]:
    """Start a Tornado app on a free port of 127.0.0.1; return its port. Stopped after."""
    servers: list[tornado.httpserver.HTTPServer] = []

    def start(handlers: list[Any]) -> int:
        sock, port = tornado.testing.bind_unused_port("127.0.0.1")
        server = tornado.httpserver.HTTPServer(tornado.web.Application(handlers))
        server.add_sockets([sock])
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop()
        await server.close_all_connections()


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Fake]]:
    """tests/test_routing.py's fakes (OpenAI-compatible, with settable status and body)."""
    made: list[Fake] = []

    def make(**attrs: Any) -> Fake:
        fake = serve_routing_fake(Fake(**attrs))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        assert fake.server is not None
        fake.server.stop()
        await fake.server.close_all_connections()


# ---------------------------------------------------------------- helpers


def gw(senv: Env) -> gateway.Service:
    service = senv.gateways[-1].service
    assert service is not None
    return service


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def totals(client: Client) -> tuple[int, int]:
    stats = (await client.status())["stats"]
    return stats["today_requests"], stats["today_tokens"]


def call_lines(senv: Env) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((senv.data_dir / "calls").glob("*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x]
    return lines


async def settled(senv: Env, count: int = 1) -> list[dict[str, Any]]:
    await until(lambda: len(call_lines(senv)) >= count, f"{count} call log lines")
    return call_lines(senv)


async def fetch(
    client: Client,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    key: str | None = ALICE_KEY,
    timeout: float = 30,
) -> tuple[int, Any, tornado.httpclient.HTTPResponse]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    resp = await client.http.fetch(
        client.base + path,
        method=method,
        body=json.dumps(body if body is not None else CHAT) if method == "POST" else None,
        headers=h,
        raise_error=False,
        request_timeout=timeout,
    )
    assert resp.code != 599, resp.error
    return resp.code, json.loads(resp.body) if resp.body[:1] == b"{" else resp.body, resp


async def raw_post(client: Client, path: str, body: bytes, key: str = ALICE_KEY) -> Any:
    """A request over a plain socket, so that the test can hang up when it likes."""
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def scrape(client: Client, admin_key: str) -> dict[str, float]:
    resp = await client.http.fetch(
        client.base + "/metrics", headers={"Authorization": f"Bearer {admin_key}"}
    )
    out = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


ADMIN_KEY = "admin-CANARY-review-0123456789"


# ---------------------------------------------------------------- count_tokens


@dataclass
class SlowCount(FakeAnthropic):
    """A fake Anthropic upstream whose count_tokens takes `count_delay` seconds."""

    count_delay: float = 0.0
    counts_arrived: int = 0


class _SlowCountHandler(MessagesHandler):
    fake: SlowCount

    async def post(self, count: str | None) -> None:
        if count:
            self.fake.counts_arrived += 1
            await asyncio.sleep(self.fake.count_delay)
        await super().post(count)


@pytest.fixture
async def anthropic_fake() -> AsyncIterator[SlowCount]:
    f = serve_anthropic(SlowCount(), _SlowCountHandler)
    yield f
    await stop_server(f)


async def test_count_tokens_left_while_queued_is_skipped_and_its_body_stays_counted(
    senv: Env, anthropic_fake: SlowCount
) -> None:
    """concurrency=1: a slow count_tokens holds the only worker; a second one waits, and its
    client hangs up. Its job is skipped (the upstream never gets it) and its body stays
    counted against --max-body-memory until the worker has taken (and dropped) the job."""
    fake = anthropic_fake
    fake.count_delay = 1.0
    client = await senv.start(
        anthropic_base_url=fake.url,
        anthropic_api_key=TEAM_KEY,
        concurrency=1,
        admin_key=ADMIN_KEY,
    )
    service = gw(senv)
    count = {"model": MODEL, "messages": MSGS}
    first = asyncio.ensure_future(fetch(client, "/v1/messages/count_tokens", count))
    await until(lambda: fake.counts_arrived == 1, "the first count_tokens upstream")
    first_size = service.bodies.used
    assert first_size > 0
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}]}
    body = json.dumps(big).encode()
    _, writer = await raw_post(client, "/v1/messages/count_tokens", body)
    await until(lambda: service.queue.waiting == 1, "the second call queued")
    assert service.bodies.used == first_size + len(body)
    writer.close()  # the second client leaves while its call waits
    await asyncio.sleep(0.3)
    assert not first.done()
    # Its body is still held by the queued job: still counted.
    assert service.bodies.used == first_size + len(body)
    metrics = await scrape(client, ADMIN_KEY)
    assert metrics["gateway_body_memory_bytes"] == first_size + len(body)
    code, doc, _ = await first
    assert code == 200 and doc == {"input_tokens": 42}
    await until(lambda: service.bodies.used == 0, "every body given back")
    await until(lambda: service.queue.waiting == 0 and service.queue.processing == 0, "idle")
    await asyncio.sleep(0.2)
    assert fake.counts_arrived == 1  # the queued job was skipped
    assert [p for p, _, _ in fake.requests] == ["/v1/messages/count_tokens"]
    assert (await scrape(client, ADMIN_KEY))["gateway_body_memory_bytes"] == 0
    assert await totals(client) == (0, 0)  # count_tokens is free


async def test_count_tokens_obeys_the_users_models(senv: Env, anthropic_fake: SlowCount) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "models": ["claude-haiku-*"]}})
    client = await senv.start(anthropic_base_url=anthropic_fake.url, anthropic_api_key=TEAM_KEY)
    headers = {"x-api-key": ALICE_KEY}
    for path in ("/v1/messages/count_tokens", "/v1/messages"):
        body: dict[str, Any] = {"model": MODEL, "messages": MSGS}
        if path == "/v1/messages":
            body["max_tokens"] = 16
        code, doc, _ = await fetch(client, path, body, headers=headers, key=None)
        assert code == 403, doc
        assert_anthropic_error(doc, "permission_error")
        assert doc["error"]["code"] == "model_not_allowed"
    assert anthropic_fake.requests == []
    code, doc, _ = await fetch(
        client,
        "/v1/messages/count_tokens",
        {"model": "claude-haiku-4-5", "messages": MSGS},
        headers=headers,
        key=None,
    )
    assert (code, doc) == (200, {"input_tokens": 42})
    assert len(anthropic_fake.requests) == 1


# ---------------------------------------------------------------- idle workers


async def test_a_worker_holds_no_job_after_the_call(senv: Env) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, **BIG}})
    client = await senv.start(concurrency=1)
    queue = gw(senv).queue
    jobs: list[weakref.ref[gateway.Job]] = []
    submit = queue.submit

    def recording_submit(job: gateway.Job) -> None:
        jobs.append(weakref.ref(job))
        submit(job)

    queue.submit = recording_submit  # type: ignore[method-assign]
    big = {"model": "m", "messages": [{"role": "user", "content": "y" * 1_000_000}]}
    for path in ("/api/call.php", "/v1/chat/completions"):
        code, _, _ = await fetch(client, path, big)
        assert code == 200
    await until(lambda: queue.processing == 0 and queue.waiting == 0, "the worker idle")
    await asyncio.sleep(0.05)
    gc.collect()
    assert len(jobs) == 2
    assert [ref() is None for ref in jobs] == [True, True], [
        [type(r).__name__ for r in gc.get_referrers(ref())] for ref in jobs if ref() is not None
    ]


# ---------------------------------------------------------------- n answers


@dataclass
class Counted:
    """What the n-answers fake received."""

    sent: list[dict[str, Any]]


class _NAnswers(tornado.web.RequestHandler):
    """A chat upstream that uses every token it may: completion = n x max_tokens sent; its
    prompt_tokens is the gateway's own estimate (so the estimate's error is zero)."""

    def initialize(self, seen: Counted, delay: float) -> None:
        self.seen, self.delay = seen, delay

    async def post(self) -> None:
        request = json.loads(self.request.body)
        self.seen.sent.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        n = request.get("n", 1)
        completion = n * request.get("max_tokens", 0)
        prompt = gateway.estimate_request_tokens(request, len(self.request.body))
        choice = {"message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
        self.finish(
            {
                "id": "chatcmpl-n",
                "object": "chat.completion",
                "choices": [{"index": i, **choice} for i in range(n)],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )


N_CALL = {**CHAT, "n": 20, "max_tokens": 500}


async def test_strict_caps_each_of_n_answers(senv: Env, serve: Callable[..., int]) -> None:
    """A strict user with 1000 tokens a day asks for 20 answers of 500 tokens: each answer
    is capped at its share of what is left, so the charge stays within the limit."""
    seen = Counted([])
    port = serve([(r"/v1/chat/completions", _NAnswers, {"seen": seen, "delay": 0.0})])
    senv.write_users(
        {
            "alice": {
                "api_key": ALICE_KEY,
                "daily_request_limit": 100,
                "daily_token_limit": 1000,
                "token_policy": "strict",
            }
        }
    )
    client = await senv.start(upstream_base_url=f"http://127.0.0.1:{port}/v1")
    code, doc, _ = await fetch(client, "/v1/chat/completions", N_CALL)
    assert code == 200, doc
    (sent,) = seen.sent
    assert sent["n"] == 20
    assert 1 <= sent["max_tokens"] <= 1000 // 20
    requests, tokens = await totals(client)
    assert requests == 1
    assert doc["usage"]["total_tokens"] == tokens
    assert tokens <= 1000, tokens  # the prompt's estimate is exact here


async def test_reserve_holds_every_answers_max_tokens(senv: Env, serve: Callable[..., int]) -> None:
    """token_policy reserve: a call in flight holds its prompt + n x max_tokens."""
    seen = Counted([])
    port = serve([(r"/v1/chat/completions", _NAnswers, {"seen": seen, "delay": 0.5})])
    senv.write_users(
        {
            "alice": {"api_key": ALICE_KEY, **BIG, "token_policy": "reserve"},
            "bob": {"api_key": BOB_KEY, **BIG, "daily_token_limit": 5000},
        }
    )
    client = await senv.start(upstream_base_url=f"http://127.0.0.1:{port}/v1")
    body = json.dumps(N_CALL).encode()
    prompt = gateway.estimate_request_tokens(json.loads(body), len(body))
    call = asyncio.ensure_future(fetch(client, "/v1/chat/completions", N_CALL))
    await until(lambda: len(seen.sent) == 1, "the call upstream")
    service = gw(senv)
    counts = service.store.peek("alice", service.clock.today())
    assert counts is not None and counts.reserved == 1
    assert counts.held == prompt + 20 * 500, (counts.held, prompt)
    assert (await call)[0] == 200
    # bob's limit (5000) is below what one such call holds: a second call in flight is refused.
    bob = asyncio.ensure_future(fetch(client, "/v1/chat/completions", N_CALL, key=BOB_KEY))
    await until(lambda: len(seen.sent) == 2, "bob's call upstream")
    code, doc, _ = await fetch(client, "/v1/chat/completions", N_CALL, key=BOB_KEY)
    assert code == 429, doc
    assert (await bob)[0] == 200
    assert len(seen.sent) == 2


# ---------------------------------------------------------------- allow_ips behind a proxy


async def test_xheaders_allow_ips_reads_x_forwarded_for_not_x_real_ip(senv: Env) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "allow_ips": ["10.0.0.0/8"]}})
    client = await senv.start(xheaders=True)
    spoofed = {"X-Real-Ip": "10.1.2.3", "X-Forwarded-For": "203.0.113.9"}
    real_ip_only = {"X-Real-Ip": "10.1.2.3"}  # the peer (127.0.0.1) is the address then
    proxied = {"X-Forwarded-For": "203.0.113.9, 10.1.2.3"}  # the proxy's own entry is last
    for path in ("/api/call.php", "/v1/chat/completions"):
        for headers in (spoofed, real_ip_only):
            code, doc, _ = await fetch(client, path, headers=headers)
            assert code == 403, (path, headers, doc)
            if path == "/api/call.php":
                assert doc["data"]["error"] == "ip_not_allowed"
            else:
                assert doc["error"]["code"] == "ip_not_allowed"
        code, doc, _ = await fetch(client, path, headers=proxied)
        assert code == 200, (path, doc)
    code, doc, _ = await fetch(client, "/v1/models", method="GET", headers=spoofed)
    assert code == 403 and doc["error"]["code"] == "ip_not_allowed"
    code, doc, _ = await fetch(client, "/v1/models", method="GET", headers=proxied)
    assert code == 200
    assert len(senv.upstream.requests) == 2


# ---------------------------------------------------------------- one model-list fetch


class _SlowModels(tornado.web.RequestHandler):
    def initialize(self, hits: list[float]) -> None:
        self.hits = hits

    async def get(self) -> None:
        self.hits.append(time.monotonic())
        await asyncio.sleep(0.3)
        self.finish({"object": "list", "data": [{"id": "m1", "object": "model"}]})


@pytest.mark.parametrize("routing", ["command_line", "upstreams_file"])
async def test_concurrent_model_lists_make_one_upstream_request(
    senv: Env, serve: Callable[..., int], routing: str
) -> None:
    hits: list[float] = []
    port = serve([(r"/v1/models", _SlowModels, {"hits": hits})])
    url = f"http://127.0.0.1:{port}/v1"
    if routing == "upstreams_file":
        path = senv.tmp / "upstreams.yaml"
        write_yaml(path, {"upstreams": {"a": up(url, K1)}})
        client = await senv.start(upstreams_file=str(path))
    else:
        client = await senv.start(upstream_base_url=url)
    results = await asyncio.gather(*(fetch(client, "/v1/models", method="GET") for _ in range(20)))
    assert [code for code, _, _ in results] == [200] * 20
    assert all([m["id"] for m in doc["data"]] == ["m1"] for _, doc, _ in results)
    assert len(hits) == 1


# ---------------------------------------------------------------- config crashes


def test_an_impossible_date_in_users_yaml_is_a_config_error() -> None:
    text = f"users:\n  alice:\n    api_key: {ALICE_KEY}\n    expires: 2027-02-30\n"
    with pytest.raises(gateway.ConfigError) as info:
        gateway.parse_users(text)
    assert ALICE_KEY not in str(info.value)
    # A real date parses.
    users = gateway.parse_users(text.replace("2027-02-30", "2027-02-28"))
    assert str(users["alice"].policy.expires) == "2027-02-28"


async def start_fails(senv: Env, path: Path) -> gateway.ConfigError:
    senv.write_users({"alice": {"api_key": ALICE_KEY}})
    g = gateway.Gateway(senv.config(upstreams_file=str(path)), now=senv.clock)
    sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
    try:
        with pytest.raises(gateway.ConfigError) as info:
            await g.start(sockets=[sock])
    finally:
        sock.close()
        await g.store.close()
    return info.value


async def test_an_unreadable_upstreams_yaml_stops_the_start(senv: Env) -> None:
    path = senv.tmp / "upstreams.yaml"
    path.write_bytes(b"upstreams:\n  a: {base_url: 'http://x/v1', api_key: k\xff\xfe}\n")
    error = await start_fails(senv, path)
    assert str(path) in str(error)
    path.unlink()
    path.mkdir()  # a directory where the file should be
    error = await start_fails(senv, path)
    assert str(path) in str(error)


# ---------------------------------------------------------------- deep error bodies

DEEP = b"[" * 100_000 + b"]" * 100_000


async def test_a_deeply_nested_error_body_is_a_502(senv: Env) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, **BIG}})
    senv.upstream.status, senv.upstream.body = 500, DEEP
    client = await senv.start()
    code, doc, _ = await fetch(client, "/api/call.php")
    assert code == 502, doc
    assert doc["success"] is False and doc["data"]["upstream_status"] == 500
    code, doc, _ = await fetch(client, "/v1/chat/completions")
    assert code == 502, doc
    assert doc["error"]["code"] == "upstream_error"
    code, doc, _ = await fetch(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert code == 502, doc
    assert doc["error"]["code"] == "upstream_error"
    assert len(senv.upstream.requests) == 3
    assert await totals(client) == (0, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_deeply_nested_error_body_fails_over(
    senv: Env, fakes: Callable[..., Fake], stream: bool
) -> None:
    a, b = fakes(status=500, body=DEEP), fakes()
    senv.write_users({"alice": {"api_key": ALICE_KEY, **BIG}})
    path = senv.tmp / "upstreams.yaml"
    write_yaml(path, {"upstreams": {"a": up(a, K1, priority=0), "b": up(b, K2, priority=1)}})
    client = await senv.start(upstreams_file=str(path))
    code, doc, _ = await fetch(client, "/v1/chat/completions", {**CHAT, "stream": stream})
    assert code == 200, doc
    assert (len(a.requests), len(b.requests)) == (1, 1)
    line = (await settled(senv))[-1]
    assert (line["upstream"], line["attempts"]) == ("b", 2)


# ---------------------------------------------------------------- a stream past its end


@dataclass
class Endless:
    """What the endless-stream fake did."""

    calls: int = 0
    after_done: int = 0  # bytes written after data: [DONE]
    hung_up: asyncio.Event | None = None


class _EndlessHandler(tornado.web.RequestHandler):
    """A chat upstream that, in a stream, goes on sending events after `data: [DONE]` (for
    up to 20 s) until the gateway hangs up; a JSON call is answered normally."""

    def initialize(self, state: Endless) -> None:
        self.state = state

    async def post(self) -> None:
        state = self.state
        state.calls += 1
        request = json.loads(self.request.body)
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if not request.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
            self.finish(
                {"id": "c", "object": "chat.completion", "choices": [choice], "usage": usage}
            )
            return
        self.set_header("Content-Type", "text/event-stream")
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ]
        try:
            for chunk in chunks:
                self.write(f"data: {json.dumps(chunk)}\n\n")
            self.write("data: [DONE]\n\n")
            await self.flush()
            junk = f"data: {json.dumps({'junk': 'z' * 500})}\n\n"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                self.write(junk)
                await self.flush()
                state.after_done += len(junk)
                await asyncio.sleep(0.005)
        except tornado.iostream.StreamClosedError:
            assert state.hung_up is not None
            state.hung_up.set()
            return
        self.finish()

    def on_connection_close(self) -> None:
        assert self.state.hung_up is not None
        self.state.hung_up.set()


async def test_a_stream_that_goes_on_after_done_is_cut_and_frees_the_worker(
    senv: Env, serve: Callable[..., int]
) -> None:
    state = Endless(hung_up=asyncio.Event())
    port = serve([(r"/v1/chat/completions", _EndlessHandler, {"state": state})])
    senv.write_users({"alice": {"api_key": ALICE_KEY, **BIG}})
    client = await senv.start(
        upstream_base_url=f"http://127.0.0.1:{port}/v1",
        concurrency=1,
        max_event_size=1024,
        upstream_timeout=60,
    )
    t0 = time.monotonic()
    code, body, _ = await asyncio.wait_for(
        fetch(client, "/v1/chat/completions", {**CHAT, "stream": True}), 5
    )
    assert code == 200
    assert b"data: [DONE]" in body
    assert time.monotonic() - t0 < 3
    assert state.hung_up is not None
    await asyncio.wait_for(state.hung_up.wait(), 3)  # the gateway closed the upstream call
    assert state.after_done > 1024
    code, doc, _ = await asyncio.wait_for(fetch(client, "/v1/chat/completions"), 5)
    assert code == 200, doc  # the only worker is free again
    assert state.calls == 2
    assert await totals(client) == (2, 30)  # each call charged once
    lines = await settled(senv, 2)
    assert [(x["status"], x["total_tokens"]) for x in lines] == [(200, 15), (200, 15)]


# ---------------------------------------------------------------- 404s in each API's shape


async def test_unknown_routes_answer_in_their_apis_shape(senv: Env) -> None:
    client = await senv.start()
    for path in ("/openai/nothing", "/v1/nothing", "/openai/v1/chat/nothing"):
        code, doc, _ = await fetch(client, path)
        assert code == 404, (path, doc)
        assert set(doc) == {"error"}, (path, doc)
        assert doc["error"]["type"] == "not_found_error"
        assert {"message", "type", "param", "code"} <= set(doc["error"])
    for path in ("/v1/messages/nothing", "/v1/messages/count_tokens/x"):
        for key in (ALICE_KEY, None):
            code, doc, _ = await fetch(client, path, key=key)
            assert code == 404, (path, doc)
            assert_anthropic_error(doc, "not_found_error")
    assert senv.upstream.requests == []


# ---------------------------------------------------------------- configured headers win


async def test_an_upstreams_configured_anthropic_headers_win(
    senv: Env, anthropic_fake: SlowCount
) -> None:
    fake = anthropic_fake
    path = senv.tmp / "upstreams.yaml"
    admin_headers = {"anthropic-version": "2024-01-01", "anthropic-beta": "admin-beta"}
    doc: dict[str, Any] = {
        "upstreams": {
            "claude": {
                "base_url": fake.url,
                "api_key": TEAM_KEY,
                "api": "anthropic",
                "headers": admin_headers,
            }
        }
    }
    write_yaml(path, doc)
    senv.write_users({"alice": {"api_key": ALICE_KEY, **BIG}})
    client = await senv.start(upstreams_file=str(path))
    theirs = {"x-api-key": ALICE_KEY, "anthropic-version": "2099-01-01", "anthropic-beta": "b1"}
    calls = [
        ("/v1/messages", {"model": MODEL, "max_tokens": 16, "messages": MSGS}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 16, "messages": MSGS, "stream": True}),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": MSGS}),
    ]

    async def sent_headers(headers: dict[str, str]) -> list[dict[str, str]]:
        before = len(fake.requests)
        for p, body in calls:
            code, answer, _ = await fetch(client, p, body, headers=headers, key=None)
            assert code == 200, answer
        return [h for _, h, _ in fake.requests[before:]]

    for headers in (theirs, {"x-api-key": ALICE_KEY}):
        for sent in await sent_headers(headers):
            assert sent["anthropic-version"] == "2024-01-01"
            assert sent["anthropic-beta"] == "admin-beta"

    # Without configured headers: the client's pass on; with neither, 2023-06-01.
    del doc["upstreams"]["claude"]["headers"]
    before = gw(senv).router.spec
    write_yaml(path, doc)
    await until(lambda: gw(senv).router.spec is not before, "the reload")
    for sent in await sent_headers(theirs):
        assert (sent["anthropic-version"], sent["anthropic-beta"]) == ("2099-01-01", "b1")
    for sent in await sent_headers({"x-api-key": ALICE_KEY}):
        assert sent["anthropic-version"] == "2023-06-01"
        assert "anthropic-beta" not in sent
    assert UPSTREAM_KEY not in json.dumps(fake.requests)


# ---------------------------------------------------------------- Responses: leaving at the end


@pytest.fixture
async def responses_fake() -> AsyncIterator[RespFake]:
    f = serve_responses(RespFake())
    yield f
    await stop_server(f)


async def test_a_responses_client_leaving_after_the_text_is_charged_the_final_usage(
    senv: Env, responses_fake: RespFake
) -> None:
    fake = responses_fake
    fake.event_delay = 0.15  # the gateway sees the client leave before response.completed
    client = await senv.start(upstream_base_url=fake.url)
    reader, writer = await open_stream(client, {"model": "m", "input": PROMPT, "stream": True})
    received = b""
    while b"response.output_text.done" not in received:
        received += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()  # the text is whole; response.completed (with the usage) is still to come
    assert b"response.completed" not in received
    line = (await settled(senv))[-1]
    assert fake.finished  # the gateway read the stream to its end
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        USAGE["input_tokens"],
        USAGE["output_tokens"],
    )
    assert line["estimated"] is False, line
    assert line["prompt_tokens"] != PROMPT_ESTIMATE
    assert await totals(client) == (1, USAGE["total_tokens"])


def _reasoning_then_end(events: list[bytes]) -> list[bytes]:
    """response.created and in_progress, then a reasoning item, added and done; then the
    body ends (cleanly) with no message and no response.completed."""
    reasoning = {"type": "reasoning", "id": "rs_fake0123", "summary": []}

    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

    return [
        *events[:2],
        event("response.output_item.added", output_index=0, item=reasoning),
        event("response.output_item.done", output_index=0, item=reasoning),
    ]


# A Responses stream whose body ends cleanly before response.completed (after a reasoning
# item, or after the text) is interrupted: the client gets the error event and the call log
# says partial, although the gateway reads on past output_item.done for a leaving client.
@pytest.mark.parametrize(
    "cut", ["reasoning_item_then_end", "text_then_end"], ids=["reasoning", "text"]
)
async def test_a_responses_stream_that_ends_before_response_completed_is_interrupted(
    senv: Env, responses_fake: RespFake, cut: str
) -> None:
    fake = responses_fake
    fake.rewrite = (
        _reasoning_then_end if cut == "reasoning_item_then_end" else (lambda events: events[:-1])
    )
    client = await senv.start(upstream_base_url=fake.url)
    code, _, resp = await fetch(
        client, "/v1/responses", {"model": "m", "input": PROMPT, "stream": True}
    )
    assert code == 200
    assert fake.finished  # the upstream's body ended normally
    names = [
        line[6:].strip() for line in resp.body.decode().split("\n") if line.startswith("event:")
    ]
    assert "response.completed" not in names
    assert names[-1] == "error", names  # the client learns the stream broke
    line = (await settled(senv))[-1]
    assert line["partial"] is True, line
    assert str(line["error"]).startswith("stream_interrupted"), line
