"""Upstream routing from upstreams.yaml: choosing (weights, priorities, model globs, mapped
names), retrying (5xx, connect errors, timeouts, 429, 401), resting and coming back, key pools,
accounting, hot reload, strict validation, `upstreams check` and key secrecy.

Real servers on 127.0.0.1: the gateway in process, several fake upstreams beside it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
import yaml
from conftest import (
    ALICE_KEY,
    ALL_SECRETS,
    BOB_KEY,
    ROOT,
    Client,
    Env,
    FakeUpstream,
    data_text,
    free_port,
)
from conftest import _ChatHandler as ChatHandler
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gateway

ADMIN_KEY = "admin-CANARY-0123456789"
HI = [{"role": "user", "content": "ping"}]
K1 = "sk-canary-ROUTE-0123456789"
K2 = "sk-canary-ROUTE-abcdefghij"
K3 = "sk-canary-ROUTE-klmnopqrst"
K4 = "sk-canary-ROUTE-uvwxyz0000"
K5 = "sk-canary-ROUTE-reloaded01"
ROUTE_KEYS = (K1, K2, K3, K4, K5)
BIG_LIMITS = {"api_key": ALICE_KEY, "daily_request_limit": 100_000, "daily_token_limit": 10**9}
# A second user: an upstream rests only after failures in a row from at least two users.
BOB_LIMITS = {**BIG_LIMITS, "api_key": BOB_KEY}
TWO_USERS = (ALICE_KEY, BOB_KEY, ALICE_KEY)  # three failing calls, from two users


# ---------------------------------------------------------------- fake upstreams


@dataclass
class Fake(FakeUpstream):
    """conftest's FakeUpstream, plus: its own model list, keys it refuses (401, for calls and
    for its model list), the keys its model list was asked with, and error bodies (and
    non-stream replies) that echo the key it was sent."""

    model_ids: list[str] = field(default_factory=lambda: ["m1", "m2"])
    refused: set[str] = field(default_factory=set)
    echo_key: bool = False
    models_keys: list[str] = field(default_factory=list)  # the key of each GET /models

    def keys_sent(self) -> list[str]:
        return [sent_key(h) for h, _ in self.requests]

    def models_sent(self) -> list[str]:
        return [json.loads(b)["model"] for _, b in self.requests]


def sent_key(headers: dict[str, str]) -> str:
    return headers.get("Authorization", "").removeprefix("Bearer ") or headers.get("X-Api-Key", "")


class _Handler(ChatHandler):
    fake: Fake

    async def get(self) -> None:
        fake = self.fake
        fake.models_calls += 1
        key = sent_key(dict(self.request.headers))
        fake.models_keys.append(key)
        if key in fake.refused:
            self.set_status(401)
            self.finish({"error": {"message": f"invalid key {key}", "type": "auth"}})
            return
        self.finish(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.model_ids]}
        )

    async def post(self) -> None:
        fake = self.fake
        key = sent_key(dict(self.request.headers))
        if key in fake.refused:
            fake.requests.append((dict(self.request.headers), self.request.body))
            self.set_status(401)
            self.finish({"error": {"message": f"invalid key {key}", "type": "auth"}})
            return
        if fake.echo_key:
            stream = json.loads(self.request.body).get("stream")
            if fake.status != 200:
                message = f"no ({fake.status}) for key {key}"
                fake.body = json.dumps({"error": {"message": message}}).encode()
            elif not stream:
                fake.body = json.dumps(
                    {
                        "id": f"chatcmpl-{key}",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f"you sent {key}"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": fake.usage,
                    }
                ).encode()
            else:
                fake.body = None
        await super().post()


def serve(fake: Fake) -> Fake:
    app = tornado.web.Application(
        [(r"/v1/(?:chat/completions|completions|embeddings|models)", _Handler, {"fake": fake})]
    )
    sock, fake.port = tornado.testing.bind_unused_port("127.0.0.1")
    fake.server = tornado.httpserver.HTTPServer(app)
    fake.server.add_sockets([sock])
    return fake


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def make(**attrs: Any) -> Fake:
        fake = serve(Fake(**attrs))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        assert fake.server is not None
        fake.server.stop()
        await fake.server.close_all_connections()


# ---------------------------------------------------------------- helpers


def write_yaml(path: Path, doc: Any) -> None:
    """Replace the file atomically (a new inode: the reloader always sees the change)."""
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def up(fake: Fake | str, key: str | list[str] = K1, **settings_: Any) -> dict[str, Any]:
    url = fake if isinstance(fake, str) else fake.url
    keys = {"api_keys": key} if isinstance(key, list) else {"api_key": key}
    return {"base_url": url, **keys, **settings_}


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


async def start(senv: Env, doc: Any, **overrides: Any) -> Client:
    senv.write_users({"alice": BIG_LIMITS, "bob": BOB_LIMITS})
    path = senv.tmp / "upstreams.yaml"
    write_yaml(path, doc)
    return await senv.start(upstreams_file=str(path), **overrides)


def router(senv: Env) -> gateway.Router:
    service = senv.gateways[-1].service
    assert service is not None
    return service.router


def key_state(senv: Env, upstream: str, secret: str) -> gateway.KeyState:
    (key,) = [k for k in router(senv).channels[upstream].keys if k.secret == secret]
    return key


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def rewrite(senv: Env, doc: Any) -> None:
    """Rewrite upstreams.yaml and wait until the gateway runs on the new routing."""
    before = router(senv).spec
    write_yaml(senv.tmp / "upstreams.yaml", doc)
    await until(lambda: router(senv).spec is not before, "the reload")


def log_lines(senv: Env) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((senv.data_dir / "calls").glob("*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines() if x]
    return lines


async def stats(client: Client) -> tuple[int, int]:
    s = (await client.status())["stats"]
    return s["today_requests"], s["today_tokens"]


def chat(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, **extra}


async def ok(client: Client, model: str = "gpt-4o", **kwargs: Any) -> dict[str, Any]:
    status, doc, _ = await client.call(chat(model), **kwargs)
    assert status == 200, doc
    return doc


async def scrape(client: Client) -> dict[str, float]:
    resp = await client.http.fetch(
        client.base + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    out = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def stream_call(client: Client, body: dict[str, Any]) -> tuple[int, list[Any], str]:
    chunks: list[bytes] = []
    resp = await client.http.fetch(
        client.base + "/v1/chat/completions",
        method="POST",
        body=json.dumps({**body, "stream": True}),
        headers={"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"},
        streaming_callback=chunks.append,
        raise_error=False,
        request_timeout=30,
    )
    text = b"".join(chunks).decode()
    events = [
        json.loads(e.removeprefix("data: "))
        for e in text.strip().split("\n\n")
        if e.startswith("data: {")
    ]
    return resp.code, events, text


class Admin:
    """A logged-in admin session (cookie + XSRF token), as tests/test_admin_web.py does it."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}
        self.xsrf = ""

    async def request(
        self, path: str, method: str = "GET", body: str | None = None, **headers: str
    ) -> tuple[int, str]:
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        resp = await self.client.http.fetch(
            self.client.base + path,
            method=method,
            body=body if method == "POST" else None,
            headers=h,
            follow_redirects=False,
            raise_error=False,
        )
        for line in resp.headers.get_list("Set-Cookie"):
            name, value = line.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value.strip('"')
        return resp.code, resp.body.decode()

    async def token(self) -> str:
        code, html = await self.request("/admin")
        assert code == 200
        match = re.search(r'name="_xsrf" value="([^"]+)"', html)
        assert match is not None
        return match.group(1)

    async def login(self) -> None:
        form = f"_xsrf={await self.token()}&key={ADMIN_KEY}"
        code, _ = await self.request(
            "/admin/login", "POST", form, Content_Type="application/x-www-form-urlencoded"
        )
        assert code == 303
        self.xsrf = await self.token()

    async def post_json(self, path: str, doc: Any) -> tuple[int, str]:
        return await self.request(
            path,
            "POST",
            json.dumps(doc),
            Content_Type="application/json",
            X_XSRFToken=self.xsrf,
        )


# ---------------------------------------------------------------- 1. choosing: weights


async def test_weights_are_exact_shares(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(), fakes()
    client = await start(
        senv, {"upstreams": {"a": up(a, weight=3), "b": up(b, K2, weight=1)}}, admin_key=ADMIN_KEY
    )
    for n in range(1, 401):
        await ok(client)
        if n % 4 == 0:  # smooth weighted round robin: exact over every 4 calls
            assert (len(a.requests), len(b.requests)) == (3 * n // 4, n // 4)
    assert (len(a.requests), len(b.requests)) == (300, 100)
    assert set(a.keys_sent()) == {K1} and set(b.keys_sent()) == {K2}

    # In flight at once: 40 concurrent calls still share 3:1.
    a.delay = b.delay = 0.1
    results = await asyncio.gather(*(client.call(chat()) for _ in range(40)))
    assert [r[0] for r in results] == [200] * 40
    in_a, in_b = len(a.requests) - 300, len(b.requests) - 100
    assert in_a + in_b == 40
    assert abs(in_a - 30) <= 3 and abs(in_b - 10) <= 3
    assert a.max_in_flight > 1 and b.max_in_flight > 1

    answered = [line["upstream"] for line in log_lines(senv)]
    assert (answered.count("a"), answered.count("b")) == (300 + in_a, 100 + in_b)
    assert {line["attempts"] for line in log_lines(senv)} == {1}
    m = await scrape(client)
    assert m['gateway_upstream_calls_total{upstream="a"}'] == 300 + in_a
    assert m['gateway_upstream_calls_total{upstream="b"}'] == 100 + in_b
    assert m['gateway_upstream_failures_total{upstream="a"}'] == 0
    assert await stats(client) == (440, 440 * 15)


async def test_lower_priority_only_when_the_higher_cannot(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a, b = fakes(), fakes()
    client = await start(
        senv,
        {"upstreams": {"b": up(b, K2, priority=1), "a": up(a, priority=0, max_concurrency=2)}},
    )
    for _ in range(5):
        await ok(client)
    assert (len(a.requests), len(b.requests)) == (5, 0)
    # At its max_concurrency, the next call goes to the lower priority at once.
    a.delay = 0.3
    results = await asyncio.gather(*(client.call(chat()) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5
    assert a.max_in_flight == 2
    assert len(a.requests) - 5 >= 2 and len(b.requests) >= 1


async def test_max_concurrency_makes_calls_wait(senv: Env, fakes: Callable[..., Fake]) -> None:
    a = fakes(delay=0.2)
    client = await start(senv, {"upstreams": {"a": up(a, max_concurrency=2)}})
    t0 = time.monotonic()
    results = await asyncio.gather(*(client.call(chat()) for _ in range(6)))
    assert [r[0] for r in results] == [200] * 6
    assert a.max_in_flight == 2
    assert time.monotonic() - t0 >= 0.55  # three rounds of two


async def test_without_the_file_one_default_upstream_as_before(senv: Env) -> None:
    """No upstreams.yaml: the command line's upstream serves every model; a failure is not
    retried, nothing rests or is disabled, and no attempts list is shown."""
    fake = senv.upstream
    senv.write_users({"alice": BIG_LIMITS})
    assert not (senv.tmp / "upstreams.yaml").exists()
    client = await senv.start()
    await ok(client, "any-model-at-all")
    for status in (500, 500, 500, 401, 401, 429):
        fake.status = status
        code, doc, _ = await client.call(chat())
        assert code == 502 and doc["data"]["upstream_status"] == status
        assert "attempts" not in doc["data"]
    assert len(fake.requests) == 7  # each tried once, none skipped
    fake.status = 200
    await ok(client)
    assert len(fake.requests) == 8
    lines = log_lines(senv)
    assert (lines[0]["upstream"], lines[0]["attempts"]) == ("default", 1)
    assert [x["attempts"] for x in lines[1:7]] == [1] * 6
    assert await stats(client) == (2, 30)


# ---------------------------------------------------------------- 2-4. failover and accounting


async def test_failover_on_500_charges_once(senv: Env, fakes: Callable[..., Fake]) -> None:
    a = fakes(status=500)
    b = fakes(usage={"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    doc = await ok(client)
    assert doc["data"]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert a.requests[0][1] == b.requests[0][1]  # the same request, on another upstream
    assert await stats(client) == (1, 11)
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"], line["status"]) == ("b", 2, 200)
    assert line["total_tokens"] == 11


async def test_connect_error_fails_over(senv: Env, fakes: Callable[..., Fake]) -> None:
    b = fakes()
    client = await start(
        senv, {"upstreams": {"a": up(refused_url(), priority=0), "b": up(b, K2, priority=1)}}
    )
    await ok(client)
    assert len(b.requests) == 1
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"]) == ("b", 2)
    assert await stats(client) == (1, 15)


async def test_hang_past_the_timeout_fails_over(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(delay=1.5), fakes()
    client = await start(
        senv,
        {"upstreams": {"a": up(a, priority=0, timeout=0.3), "b": up(b, K2, priority=1)}},
    )
    t0 = time.monotonic()
    await ok(client)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.2, elapsed  # a's own timeout, not --upstream-timeout (5 s)
    assert (len(a.requests), len(b.requests)) == (1, 1)
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"]) == ("b", 2)
    await until(lambda: a.in_flight == 0, "the fake's hung handler")


async def test_429_rests_the_key_for_retry_after(senv: Env, fakes: Callable[..., Fake]) -> None:
    a = fakes(status=429, headers={"Retry-After": "2"})
    b = fakes()
    client = await start(
        senv,
        {
            "upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)},
            "cooldown_seconds": 30,  # Retry-After wins over the cooldown
        },
    )
    t0 = time.monotonic()
    await ok(client)
    assert (len(a.requests), len(b.requests)) == (1, 1)
    a.status, a.headers = 200, {}
    await ok(client)  # a's only key rests: straight to b
    assert (len(a.requests), len(b.requests)) == (1, 2)
    await asyncio.sleep(max(0.0, t0 + 1.5 - time.monotonic()))
    await ok(client)  # still resting after 1.5 s
    assert (len(a.requests), len(b.requests)) == (1, 3)
    await asyncio.sleep(max(0.0, t0 + 2.3 - time.monotonic()))
    await ok(client)  # back after 2 s
    assert (len(a.requests), len(b.requests)) == (2, 3)
    assert [line["upstream"] for line in log_lines(senv)] == ["b", "b", "b", "a"]


async def test_every_upstream_fails(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(status=500), fakes(status=503)
    client = await start(
        senv,
        {
            "upstreams": {
                "a": up(a, K1, priority=0),
                "b": up(b, K2, priority=1),
                "c": up(refused_url(), K3, priority=2),
            },
            "retries": 2,
        },
    )
    status, doc, _ = await client.call(chat())
    assert status == 502, doc
    assert doc["success"] is False
    attempts = doc["data"]["attempts"]
    assert [(x["upstream"], x["status"]) for x in attempts] == [
        ("a", 500),
        ("b", 503),
        ("c", None),
    ]
    assert "upstream says no (500)" in attempts[0]["error"]
    assert attempts[2]["error"].startswith("connection failed")
    status, v1, _ = await client.call(chat(), path="/v1/chat/completions")
    assert status == 502
    assert v1["error"]["code"] == "upstream_error"
    assert [(x["upstream"], x["status"]) for x in v1["error"]["attempts"]] == [
        ("a", 500),
        ("b", 503),
        ("c", None),
    ]
    assert await stats(client) == (0, 0)
    lines = log_lines(senv)
    assert [(x["status"], x["attempts"], x["upstream"]) for x in lines] == [(502, 3, None)] * 2
    assert lines[0]["total_tokens"] == 0
    for text in (json.dumps(doc), json.dumps(v1), data_text(senv.data_dir)):
        for secret in (*ROUTE_KEYS, *ALL_SECRETS):
            assert secret not in text


async def test_all_resting_fails_at_once_with_retry_after(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a = fakes(status=500)
    client = await start(senv, {"upstreams": {"a": up(a)}, "retries": 0, "cooldown_seconds": 30})
    for key in TWO_USERS:  # three answered 5xx in a row, from two users: a rests
        assert (await client.call(chat(), key=key))[0] == 502
    assert len(a.requests) == 3
    assert router(senv).channels["a"].resting_until > 0
    t0 = time.monotonic()
    status, doc, headers = await client.call(chat())
    assert time.monotonic() - t0 < 1.0  # no 30 s wait
    assert status == 502
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert "resting" in doc["data"]["error"]
    assert len(a.requests) == 3  # not called
    assert await stats(client) == (0, 0)


async def test_all_resting_briefly_the_call_waits(senv: Env, fakes: Callable[..., Fake]) -> None:
    a = fakes(status=500)
    client = await start(senv, {"upstreams": {"a": up(a)}, "retries": 0, "cooldown_seconds": 1.5})
    for key in TWO_USERS:
        assert (await client.call(chat(), key=key))[0] == 502
    assert router(senv).channels["a"].resting_until > 0
    a.status = 200
    t0 = time.monotonic()
    await ok(client)  # rests 1.5 s (< 3 s): the call waits for it, then it answers
    assert 0.8 <= time.monotonic() - t0 < 3.0
    assert len(a.requests) == 4
    assert await stats(client) == (1, 15)


# ---------------------------------------------------------------- 5. client faults


async def test_400_is_passed_on_not_retried(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(status=400), fakes()
    client = await start(
        senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}, "retries": 2}
    )
    status, v1, _ = await client.call(chat(), path="/v1/chat/completions")
    assert status == 400, v1
    assert v1["error"]["code"] == "upstream_error"
    assert "upstream says no (400)" in v1["error"]["message"]
    assert (len(a.requests), len(b.requests)) == (1, 0)
    status, doc, _ = await client.call(chat())
    assert status == 502
    assert doc["data"]["upstream_status"] == 400
    assert (len(a.requests), len(b.requests)) == (2, 0)
    assert await stats(client) == (0, 0)
    # A client fault is not the upstream's failure: a third one does not send it to rest.
    assert (await client.call(chat()))[0] == 502
    a.status = 200
    await ok(client)
    assert (len(a.requests), len(b.requests)) == (4, 0)


# ---------------------------------------------------------------- 6. streams


async def test_no_retry_after_a_stream_started(senv: Env, fakes: Callable[..., Fake]) -> None:
    a = fakes(cut_after=2, stream_delay=0.05)
    b = fakes()
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    status, events, text = await stream_call(client, chat())
    assert status == 200
    assert "data: [DONE]" not in text
    assert [e["choices"][0]["delta"]["content"] for e in events if e.get("choices")] == [
        "Hel",
        "lo",
    ]
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert (len(a.requests), len(b.requests)) == (1, 0)
    await until(lambda: bool(log_lines(senv)), "the call log line")
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"], line["partial"]) == ("a", 1, True)
    assert line["error"].startswith("stream_interrupted")
    assert (await stats(client))[0] == 1


async def test_stream_that_fails_before_a_byte_is_retried(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a, b = fakes(status=503), fakes()
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    status, events, text = await stream_call(client, chat())
    assert status == 200
    assert "data: [DONE]" in text
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Hello world"
    assert (len(a.requests), len(b.requests)) == (1, 1)
    await until(lambda: bool(log_lines(senv)), "the call log line")
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"]) == ("b", 2)


# ---------------------------------------------------------------- 7. rest and recovery


async def test_cooldown_and_one_trial_call(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(status=500), fakes()
    client = await start(
        senv,
        {
            "upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)},
            "cooldown_seconds": 1,
        },
        admin_key=ADMIN_KEY,
    )
    for key in TWO_USERS:  # answered 5xx from two users: a rests after the third
        await ok(client, key=key)
    assert (len(a.requests), len(b.requests)) == (3, 3)
    m = await scrape(client)
    assert m['gateway_upstream_state{upstream="a"}'] == 1  # resting
    assert m['gateway_upstream_state{upstream="b"}'] == 0
    assert m['gateway_upstream_failures_total{upstream="a"}'] == 3
    t0 = time.monotonic()
    for _ in range(3):
        await ok(client)
    assert (len(a.requests), len(b.requests)) == (3, 6)  # a rests: calls go elsewhere

    # After the cooldown, one trial call; it fails: a rests again at once (not after 3, and
    # although the trial's failure comes from one user alone).
    await asyncio.sleep(max(0.0, t0 + 1.1 - time.monotonic()))
    await ok(client)
    assert (len(a.requests), len(b.requests)) == (4, 7)
    t1 = time.monotonic()
    for _ in range(2):
        await ok(client)
    assert (len(a.requests), len(b.requests)) == (4, 9)

    # After the next cooldown, one trial call at a time: concurrent calls go elsewhere.
    a.status, a.delay = 200, 0.3
    await asyncio.sleep(max(0.0, t1 + 1.1 - time.monotonic()))
    results = await asyncio.gather(*(client.call(chat()) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5
    assert (len(a.requests), len(b.requests)) == (5, 13)
    # It succeeded: a is back and takes every call again.
    a.delay = 0
    for _ in range(3):
        await ok(client)
    assert (len(a.requests), len(b.requests)) == (8, 13)
    assert (await scrape(client))['gateway_upstream_state{upstream="a"}'] == 0
    assert await stats(client) == (17, 17 * 15)


# ---------------------------------------------------------------- 8. key pools


async def test_key_pool_turns_401_disables_reload_and_admin_reenable(
    senv: Env, fakes: Callable[..., Fake], caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 sends the call on to the next key at once; the refused key is taken out of use
    only when its own model-list request (GET /models, in the background) is refused too.
    A refused key is checked at most once per cooldown_seconds (here 1 s)."""
    a = fakes()
    doc = {"upstreams": {"a": up(a, [K1, K2])}, "cooldown_seconds": 1}

    def k1_disabled() -> bool:
        return bool(key_state(senv, "a", K1).disabled)

    async def refuse_k1_again() -> None:
        """Refuse K1 (calls and model list) once its last check is a cooldown old, then
        make calls until the check has taken it out of use."""
        a.refused = {K1}
        checked = key_state(senv, "a", K1).checked_at
        await asyncio.sleep(max(0.0, checked + 1.1 - time.monotonic()))
        checks = len(a.models_keys)
        for _ in range(2):
            await ok(client)
        await until(k1_disabled, "K1's model-list check")
        assert a.models_keys[checks:] == [K1]  # one check, with the refused key

    with caplog.at_level(logging.INFO):
        client = await start(senv, doc, admin_key=ADMIN_KEY)
        for _ in range(4):
            await ok(client)
        assert a.keys_sent() == [K1, K2, K1, K2]

        a.refused = {K1}
        await ok(client)  # K1: 401, then K2 answers
        assert a.keys_sent()[4:] == [K1, K2]
        assert log_lines(senv)[-1]["attempts"] == 2
        await until(k1_disabled, "K1's model-list check")
        assert a.models_keys == [K1]  # checked with its own key, once
        for _ in range(4):
            await ok(client)
        assert a.keys_sent()[6:] == [K2] * 4  # K1 is out of use
        fp1, fp2 = gateway.key_fingerprint(K1), gateway.key_fingerprint(K2)
        assert re.fullmatch(r"sha256:[0-9a-f]{12}", fp1)
        m = await scrape(client)
        assert m[f'gateway_upstream_key_state{{upstream="a",key="{fp1}"}}'] == 2
        assert m[f'gateway_upstream_key_state{{upstream="a",key="{fp2}"}}'] == 0
        assert m['gateway_upstream_state{upstream="a"}'] == 0  # one key left: still ok

        # The file changes (even to the same text): the key is back.
        a.refused = set()
        await rewrite(senv, doc)
        for _ in range(2):
            await ok(client)
        assert set(a.keys_sent()[10:]) == {K1, K2}

        # Refused again; an admin re-enables it by fingerprint.
        await refuse_k1_again()
        a.refused = set()
        admin = Admin(client)
        await admin.login()
        code, state = await admin.request("/admin/api/state")
        assert code == 200
        (row,) = json.loads(state)["data"]["upstreams"]
        assert row["name"] == "a" and row["state"] == "ok"
        assert {k["fingerprint"]: k["state"] for k in row["keys"]} == {
            fp1: "disabled",
            fp2: "ok",
        }
        code, body = await admin.post_json(
            "/admin/api/upstreams/enable-key", {"upstream": "a", "key": "sha256:000000000000"}
        )
        assert code == 404
        code, body = await Admin(client).post_json(
            "/admin/api/upstreams/enable-key", {"upstream": "a", "key": fp1}
        )
        assert code in (401, 403)  # not logged in
        code, body = await admin.post_json(
            "/admin/api/upstreams/enable-key", {"upstream": "a", "key": fp1}
        )
        assert code == 200, body
        sent = len(a.requests)
        for _ in range(2):
            await ok(client)
        assert set(a.keys_sent()[sent:]) == {K1, K2}

        # Refused again; a file change to the upstream's own settings brings it back too.
        await refuse_k1_again()
        a.refused = set()
        doc["upstreams"]["a"]["timeout"] = 60
        await rewrite(senv, doc)
        sent = len(a.requests)
        for _ in range(2):
            await ok(client)
        assert set(a.keys_sent()[sent:]) == {K1, K2}
        outputs = state + body + json.dumps(await scrape(client))

    logs = "\n".join(r.getMessage() for r in caplog.records)
    refusals = [r.getMessage() for r in caplog.records if "refused key" in r.getMessage()]
    assert len(refusals) == 3 and all(fp1 in r for r in refusals)
    for secret in ROUTE_KEYS:
        assert secret not in logs
        assert secret not in outputs
        assert secret not in data_text(senv.data_dir)


# ---------------------------------------------------------------- 8b. one user cannot take
# upstreams or keys out of service (answered 5xx from two users, 401/403 checked, 429 capped)


# One user's failing calls never rest an upstream, however many in a row (the fourth once did:
# it was taken for a trial call back from a rest that never happened).
async def test_one_users_failures_never_rest_an_upstream_two_users_do(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a, b = fakes(status=500), fakes()
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    for n in range(1, 11):  # alice's request draws a 500 from a, ten times in a row
        await ok(client)
        assert (len(a.requests), len(b.requests)) == (n, n)
    ch = router(senv).channels["a"]
    assert (ch.failures_in_row, ch.resting_until) == (10, 0.0)
    assert ch.state(time.monotonic()) == "ok"
    assert [(x["upstream"], x["attempts"]) for x in log_lines(senv)] == [("b", 2)] * 10
    # Another user's next call still goes to a first; its failure is the second user's:
    # now a rests.
    await ok(client, key=BOB_KEY)
    assert (len(a.requests), len(b.requests)) == (11, 11)
    assert ch.resting_until > time.monotonic() + 20  # the default cooldown, 30 s
    await ok(client)
    assert (len(a.requests), len(b.requests)) == (11, 12)  # straight to b
    assert log_lines(senv)[-1]["attempts"] == 1
    assert await stats(client) == (12, 12 * 15)


async def test_connect_errors_from_one_user_rest_an_upstream(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    """No request chooses a refused connection: it counts as another user's failure."""
    b = fakes()
    client = await start(
        senv, {"upstreams": {"a": up(refused_url(), priority=0), "b": up(b, K2, priority=1)}}
    )
    for _ in range(3):
        await ok(client)
    assert router(senv).channels["a"].resting_until > time.monotonic()
    await ok(client)
    assert [x["attempts"] for x in log_lines(senv)] == [2, 2, 2, 1]


async def test_a_request_specific_403_never_disables_the_key(
    senv: Env, fakes: Callable[..., Fake], caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream refuses this request (403) but its model list with the same key is
    fine: the key stays in use, and is checked at most once per cooldown."""
    a = fakes(status=403)  # 403 to chat calls; GET /models answers 200
    b = fakes()
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    with caplog.at_level(logging.INFO):
        await ok(client)  # a: 403, then b
        assert (len(a.requests), len(b.requests)) == (1, 1)
        await until(lambda: a.models_calls == 1, "the key's model-list check")
        assert a.models_keys == [K1]
        await until(lambda: not router(senv)._checks, "the check's answer")
        key = key_state(senv, "a", K1)
        assert not key.disabled
        for _ in range(5):  # more 403s within the cooldown (30 s): no more checks
            await ok(client)
        assert (len(a.requests), len(b.requests)) == (6, 6)  # a's key is tried every time
        await asyncio.sleep(0.1)
        assert a.models_calls == 1
        assert not key.disabled
        a.status = 200
        for _ in range(2):
            await ok(client)
        assert (len(a.requests), len(b.requests)) == (8, 6)
        assert a.keys_sent() == [K1] * 8
        assert [x["upstream"] for x in log_lines(senv)][-2:] == ["a", "a"]
    assert "refused key" not in caplog.text


async def test_429_retry_after_rests_a_key_at_most_60_s(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a = fakes(status=429, headers={"Retry-After": "3600"})
    b = fakes()
    client = await start(
        senv,
        {
            "upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)},
            "cooldown_seconds": 600,
        },
        admin_key=ADMIN_KEY,
    )
    await ok(client)
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert gateway.MAX_KEY_REST == 60
    rest = key_state(senv, "a", K1).resting_until - time.monotonic()
    assert 55 < rest <= 60, rest
    admin = Admin(client)
    await admin.login()
    code, state = await admin.request("/admin/api/state")
    assert code == 200
    row = next(r for r in json.loads(state)["data"]["upstreams"] if r["name"] == "a")
    (key,) = row["keys"]
    assert key["state"] == "resting"
    until_wall = datetime.fromisoformat(key["resting_until"]).timestamp()
    assert 50 < until_wall - time.time() <= 61, key["resting_until"]
    a.status, a.headers = 200, {}
    await ok(client)  # still resting: straight to b
    assert (len(a.requests), len(b.requests)) == (1, 2)
    # Without Retry-After, the cooldown (600 s here) is capped the same way.
    a.status = 429
    key_state(senv, "a", K1).resting_until = 0.0
    await ok(client)
    rest = key_state(senv, "a", K1).resting_until - time.monotonic()
    assert 55 < rest <= 60, rest


async def test_529_is_retried_on_another_upstream(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(status=529), fakes()  # 529: Anthropic's "overloaded"
    client = await start(senv, {"upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)}})
    doc = await ok(client)
    assert doc["data"]["usage"]["total_tokens"] == 15
    assert (len(a.requests), len(b.requests)) == (1, 1)
    (line,) = log_lines(senv)
    assert (line["upstream"], line["attempts"], line["status"]) == ("b", 2, 200)
    assert router(senv).channels["a"].failures == 1


class _Redirect(tornado.web.RequestHandler):
    def initialize(self, target: str, hits: list[str]) -> None:
        self.target, self.hits = target, hits

    def post(self) -> None:
        self.hits.append(self.request.path)
        self.redirect(self.target, status=302)

    def get(self) -> None:
        self.post()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_redirect_is_not_followed(
    senv: Env, fakes: Callable[..., Fake], stream: bool
) -> None:
    """An upstream's 302 would take the team's key and the user's body to another host: the
    gateway does not follow it; the client gets a 502 and the target hears nothing."""
    target = fakes()  # the redirect's target, not in upstreams.yaml
    hits: list[str] = []
    app = tornado.web.Application(
        [(r"/v1/.*", _Redirect, {"target": target.url + "/chat/completions", "hits": hits})]
    )
    sock, port = tornado.testing.bind_unused_port("127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        client = await start(senv, {"upstreams": {"a": up(f"http://127.0.0.1:{port}/v1")}})
        if stream:
            code, _, text = await stream_call(client, chat())
            assert code == 502, text
        else:
            code, doc, _ = await client.call(chat())
            assert code == 502, doc
            assert doc["data"]["upstream_status"] == 302
        assert hits == ["/v1/chat/completions"]
        await asyncio.sleep(0.1)
        assert (len(target.requests), target.models_calls) == (0, 0)
        assert await stats(client) == (0, 0)
    finally:
        server.stop()
        await server.close_all_connections()


# ---------------------------------------------------------------- 9-10. models


async def test_model_mapping_pinning_and_unknown_models(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    o, x, d = fakes(), fakes(), fakes()
    client = await start(
        senv,
        {
            "upstreams": {
                "openai": up(o, K1, models=["gpt-4o*"]),
                "other": up(x, K2, models=["gpt-4o*"]),
                "deepseek": up(d, K3, models=["deepseek-*"]),
            },
            "models": {
                "gpt-3.5-turbo": "deepseek-chat",
                "fast": {"model": "gpt-4o-mini", "upstream": "openai"},
            },
        },
    )
    await ok(client, "gpt-3.5-turbo")
    status, _, _ = await client.call(chat("gpt-3.5-turbo"), path="/v1/chat/completions")
    assert status == 200
    code, _, text = await stream_call(client, chat("gpt-3.5-turbo"))
    assert code == 200 and "data: [DONE]" in text
    assert d.models_sent() == ["deepseek-chat"] * 3
    for _ in range(4):
        await ok(client, "fast")
    assert (o.models_sent(), x.models_sent()) == (["gpt-4o-mini"] * 4, [])
    for _ in range(2):
        await ok(client, "gpt-4o-mini")
    assert (len(o.requests), len(x.requests)) == (5, 1)  # the glob: shared
    await ok(client, "deepseek-coder")
    assert d.models_sent()[-1] == "deepseek-coder"
    before = await stats(client)
    assert before[0] == 10
    sent = len(o.requests) + len(x.requests) + len(d.requests)

    status, doc, _ = await client.call(chat("llama-3"))
    assert status == 400
    assert doc["data"]["field"] == "model" and "llama-3" in doc["data"]["error"]
    status, v1, _ = await client.call(chat("llama-3"), path="/v1/chat/completions")
    assert status == 404
    assert v1["error"]["code"] == "model_not_found" and "llama-3" in v1["error"]["message"]
    status, _, _ = await client.call(chat("deepseek-x"))
    assert status == 200  # a glob match
    assert len(o.requests) + len(x.requests) + len(d.requests) == sent + 1
    assert await stats(client) == (before[0] + 1, before[1] + 15)


async def test_v1_models_is_the_union_filtered_by_globs(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    a = fakes(model_ids=["gpt-4o", "gpt-4o-mini", "dall-e-3"])
    b = fakes(model_ids=["deepseek-chat", "deepseek-coder", "gpt-4o", "whisper-1"])
    anthropic = fakes(model_ids=["claude-x"])
    client = await start(
        senv,
        {
            "upstreams": {
                "a": up(a, K1, models=["gpt-4o*"]),
                "b": up(b, K2, models=["deepseek-*"]),
                "down": up(refused_url(), K3, models=["exact-model", "glob-*"]),
                "claude": up(anthropic, K4, api="anthropic", models=["claude-*"]),
            },
            "models": {
                "gpt-3.5-turbo": "deepseek-chat",
                "fast": {"model": "gpt-4o-mini", "upstream": "a"},
            },
        },
    )
    resp = await client.http.fetch(client.base + "/v1/models", headers={"X-API-Key": ALICE_KEY})
    ids = [m["id"] for m in json.loads(resp.body)["data"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {
        "gpt-4o",
        "gpt-4o-mini",
        "deepseek-chat",
        "deepseek-coder",
        "exact-model",  # an upstream that cannot say: its globs that name one model
        "gpt-3.5-turbo",
        "fast",
    }
    assert anthropic.models_calls == 0
    resp = await client.http.fetch(
        client.base + "/v1/models/fast", headers={"X-API-Key": ALICE_KEY}
    )
    assert json.loads(resp.body)["id"] == "fast"


# ---------------------------------------------------------------- 11. validation and reload

GOOD_UPSTREAM = {"base_url": "http://127.0.0.1:9/v1", "api_key": K1}
BROKEN = [
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "wieght": 3}}}, r"upstreams\.a.*'wieght'"),
    ({"upstreams": {"a": GOOD_UPSTREAM}, "retry": 2}, r"unknown setting 'retry'"),
    (
        {"upstreams": {"a": {"base_url": "http://x/v1", "api_key_env": "ROUTING_TEST_UNSET"}}},
        r"upstreams\.a\.api_key_env.*ROUTING_TEST_UNSET",
    ),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "base_url": "ftp://x/v1"}}}, r"upstreams\.a\.base_url"),
    (
        {"upstreams": {"a": {**GOOD_UPSTREAM, "base_url": "127.0.0.1/v1"}}},
        r"upstreams\.a\.base_url",
    ),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "weight": 0}}}, r"upstreams\.a\.weight"),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "weight": 2.5}}}, r"upstreams\.a\.weight"),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "timeout": "soon"}}}, r"upstreams\.a\.timeout"),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "priority": -1}}}, r"upstreams\.a\.priority"),
    ({"upstreams": {"a": GOOD_UPSTREAM}, "retries": 11}, r"retries"),
    ({"upstreams": {"a": GOOD_UPSTREAM}, "cooldown_seconds": "x"}, r"cooldown_seconds"),
    (
        {"upstreams": {"a": {**GOOD_UPSTREAM, "models": ["gpt-[4o"]}}},
        r"upstreams\.a\.models.*gpt-\[4o",
    ),
    (
        {
            "upstreams": {"a": GOOD_UPSTREAM},
            "models": {"fast": {"model": "m", "upstream": "nowhere"}},
        },
        r"models\.fast\.upstream.*nowhere",
    ),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "api_keys": [K2]}}}, r"upstreams\.a.*exactly one"),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "api": "gemini"}}}, r"upstreams\.a\.api"),
    ({"upstreams": {"a": {**GOOD_UPSTREAM, "headers": {"Authorization": "x"}}}}, r"headers"),
    ({"upstreams": {}}, r"upstreams"),
    ("upstreams: [a, b", r"YAML"),
]


@pytest.mark.parametrize(("doc", "pattern"), BROKEN)
async def test_broken_file_stops_the_start(
    senv: Env, doc: Any, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROUTING_TEST_UNSET", raising=False)
    senv.write_users({"alice": BIG_LIMITS})
    path = senv.tmp / "upstreams.yaml"
    write_yaml(path, doc)
    gw = gateway.Gateway(senv.config(upstreams_file=str(path)), now=senv.clock)
    sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
    try:
        with pytest.raises(gateway.ConfigError, match=pattern) as info:
            await gw.start(sockets=[sock])
    finally:
        sock.close()
        await gw.store.close()
    assert str(path) in str(info.value)
    assert K1 not in str(info.value) and K2 not in str(info.value)


def test_a_bad_key_is_refused_without_being_quoted() -> None:
    secret = "sk-canary-ROUTE has a space"
    doc = yaml.safe_dump({"upstreams": {"a": {"base_url": "http://x/v1", "api_key": secret}}})
    with pytest.raises(gateway.ConfigError, match=r"upstreams\.a\.api_key") as info:
        gateway.parse_routing(doc, {}, gateway.Config())
    assert "canary" not in str(info.value)


async def test_hot_reload_keeps_the_last_good_routing(
    senv: Env, fakes: Callable[..., Fake], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = fakes(), fakes()
    client = await start(senv, {"upstreams": {"a": up(a)}})
    for _ in range(2):
        await ok(client)
    good = router(senv).spec
    path = senv.tmp / "upstreams.yaml"
    with caplog.at_level(logging.INFO):
        write_yaml(path, {"upstreams": {"b": up(b, K2, wieght=1)}})
        await until(lambda: "not reloaded" in caplog.text, "the reload error")
        assert "wieght" in caplog.text
        for _ in range(3):
            await ok(client)
        assert router(senv).spec is good
        assert (len(a.requests), len(b.requests)) == (5, 0)
        # A good edit takes effect; a's figures survive it.
        await rewrite(senv, {"upstreams": {"a": up(a, priority=1), "b": up(b, K2, priority=0)}})
        assert router(senv).channels["a"].calls == 5
        for _ in range(3):
            await ok(client)
        assert (len(a.requests), len(b.requests)) == (5, 3)
        # An upstream taken out of the file gets no more calls.
        await rewrite(senv, {"upstreams": {"a": up(a)}})
        for _ in range(2):
            await ok(client)
        assert (len(a.requests), len(b.requests)) == (7, 3)
    assert await stats(client) == (10, 150)
    for secret in ROUTE_KEYS:
        assert secret not in caplog.text


async def test_rest_and_figures_survive_a_reload(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b, c = fakes(status=500), fakes(), fakes()
    doc = {
        "upstreams": {"a": up(a, priority=0), "b": up(b, K2, priority=1)},
        "cooldown_seconds": 30,
    }
    client = await start(senv, doc)
    for key in TWO_USERS:
        await ok(client, key=key)
    assert router(senv).channels["a"].resting_until > 0
    a.status = 200
    # Another upstream added: a is unchanged and still rests.
    doc["upstreams"]["c"] = up(c, K3, priority=2)
    await rewrite(senv, doc)
    await ok(client)
    assert (len(a.requests), len(b.requests), len(c.requests)) == (3, 4, 0)
    # a's own settings changed (same base_url): its health and figures carry over.
    doc["upstreams"]["a"]["timeout"] = 60
    await rewrite(senv, doc)
    await ok(client)
    assert (len(a.requests), len(b.requests), len(c.requests)) == (3, 5, 0)
    assert (router(senv).channels["a"].calls, router(senv).channels["a"].failures) == (3, 3)
    # Another base_url: another upstream under the same name, starting afresh.
    a2 = fakes()
    doc["upstreams"]["a"]["base_url"] = a2.url
    await rewrite(senv, doc)
    await ok(client)
    assert (len(a2.requests), len(b.requests)) == (1, 5)


# ---------------------------------------------------------------- 12. reload under load


async def test_hot_reload_under_load_loses_nothing(senv: Env, fakes: Callable[..., Fake]) -> None:
    # Slow enough (7 rounds of 32 calls, 0.25 s each) that every rewrite lands mid-load,
    # also on a busy CI machine.
    a, b, c = fakes(delay=0.25), fakes(delay=0.25), fakes(delay=0.25)
    docs = [
        {"upstreams": {"a": up(a, weight=1), "b": up(b, K2, weight=1)}},
        {"upstreams": {"a": up(a, weight=1), "b": up(b, K2, weight=3)}},
        {"upstreams": {"a": up(a, weight=2), "b": up(b, K2), "c": up(c, K3)}},
        {"upstreams": {"b": up(b, K2), "c": up(c, K3, weight=2)}},
        {"upstreams": {"a": up(a, weight=1, timeout=60), "c": up(c, K3, weight=1)}},
    ]
    # One user sends all 200: --user-queue-share would refuse some with 503 (32 workers + 128
    # waiting) whenever all of them arrive before the first answers.
    client = await start(
        senv, docs[0], admin_key=ADMIN_KEY, shutdown_timeout=2, user_queue_share=1.0
    )
    calls = asyncio.gather(*(client.call(chat()) for _ in range(200)))
    for doc in docs[1:]:
        await asyncio.sleep(0.05)
        await rewrite(senv, doc)
    assert not calls.done()  # every rewrite landed while calls were running
    results = await asyncio.wait_for(calls, 20)
    assert [r[0] for r in results] == [200] * 200
    assert await stats(client) == (200, 200 * 15)
    assert len(a.requests) + len(b.requests) + len(c.requests) == 200
    assert len(c.requests) > 0
    lines = log_lines(senv)
    assert len(lines) == 200 and {x["status"] for x in lines} == {200}
    m = await scrape(client)
    assert all(m[f'gateway_upstream_in_flight{{upstream="{n}"}}'] == 0 for n in ("a", "c"))


async def test_reload_with_calls_in_flight_frees_their_slots(
    senv: Env, fakes: Callable[..., Fake]
) -> None:
    """Calls in flight across a reload release the upstream they started on: none is left
    counted in flight (which would cap the upstream for good), and an unchanged upstream's
    max_concurrency holds across the reload."""
    a = fakes(delay=0.5)
    doc = {"upstreams": {"a": up(a, max_concurrency=2)}}
    client = await start(senv, doc, admin_key=ADMIN_KEY, shutdown_timeout=1)

    async def in_flight() -> float:
        return (await scrape(client))['gateway_upstream_in_flight{upstream="a"}']

    for change in ({}, {"timeout": 30}):  # the same file again; then a changed setting
        first = [asyncio.ensure_future(client.call(chat())) for _ in range(2)]
        await until(lambda: a.in_flight == 2, "two calls in flight")
        doc["upstreams"]["a"].update(change)
        await rewrite(senv, doc)
        if not change:  # the same upstream: its cap still counts the two in flight
            third = asyncio.ensure_future(client.call(chat()))
            await asyncio.sleep(0.2)
            assert a.in_flight == 2 and len(a.requests) == 2
            first.append(third)
        done, pending = await asyncio.wait(first, timeout=5)
        for f in pending:
            f.cancel()
        assert not pending, "calls never got a slot on upstream a"
        assert [f.result()[0] for f in first] == [200] * len(first)
        assert await in_flight() == 0
        later = asyncio.ensure_future(client.call(chat()))
        done, _ = await asyncio.wait([later], timeout=3)
        if not done:
            later.cancel()
        assert done and later.result()[0] == 200, "the next call never reached upstream a"
        a.requests.clear()
    assert await in_flight() == 0
    assert a.max_in_flight <= 2 + 2  # a changed upstream starts afresh beside the old calls


# ---------------------------------------------------------------- 13. upstreams check


async def run_check(cwd: Path, *args: str) -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("UPSTREAM_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "gateway.py"),
        "upstreams",
        "check",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_upstreams_check_command(senv: Env, fakes: Callable[..., Fake]) -> None:
    a, b = fakes(model_ids=["x", "y", "z"]), fakes()
    senv.write_users({"alice": BIG_LIMITS})
    path = senv.tmp / "routes.yaml"
    write_yaml(path, {"upstreams": {"a": up(a, [K1, K2]), "b": up(b, K3)}})
    fps = [gateway.key_fingerprint(k) for k in (K1, K2, K3)]

    code, out, err = await run_check(senv.tmp, f"--upstreams-file={path}")
    assert code == 0, out + err
    for fp in fps:
        assert fp in out
    assert a.models_calls == 2 and b.models_calls == 1

    a.refused = {K2}  # its 401 body echoes the key
    code, out, err = await run_check(senv.tmp, f"--upstreams-file={path}", "--format=json")
    assert code == 1, out + err
    rows = {(r["upstream"], r["key"]): r for r in json.loads(out)}
    assert set(rows) == {("a", fps[0]), ("a", fps[1]), ("b", fps[2])}
    assert rows[("a", fps[1])]["result"] == "failed" and rows[("a", fps[1])]["status"] == 401
    assert rows[("a", fps[0])]["result"] == "ok" and rows[("a", fps[0])]["models"] == 3
    assert rows[("b", fps[2])]["result"] == "ok"
    texts = [out + err]

    write_yaml(path, {"upstreams": {"a": {**up(a, K1), "wieght": 1}}})
    code, out, err = await run_check(senv.tmp, f"--upstreams-file={path}")
    assert code == 2
    assert "wieght" in err
    texts.append(out + err)
    for text in texts:
        for secret in ROUTE_KEYS:
            assert secret not in text


# ---------------------------------------------------------------- 14. canary keys


async def test_route_keys_appear_nowhere(
    senv: Env,
    fakes: Callable[..., Fake],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every upstream echoes the key it was sent (errors, replies, its model list): no key
    of upstreams.yaml reaches a response, a log line or a file under data/."""
    monkeypatch.setenv("ROUTE_CANARY_KEY", K3)
    a = fakes(status=500, echo_key=True)
    b = fakes(status=429, echo_key=True)
    c = fakes(echo_key=True, model_ids=[f"model-{K4}", "gpt-4o"])
    doc: dict[str, Any] = {
        "upstreams": {
            "a": up(a, [K1, K2], priority=0),
            "b": {"base_url": b.url, "api_key_env": "ROUTE_CANARY_KEY", "priority": 1},
            "c": up(c, K4, priority=2),
        },
        "retries": 3,
    }
    seen: list[str] = []

    async def call(
        path: str = "/api/call.php", expect: int = 200, key: str = ALICE_KEY
    ) -> dict[str, Any]:
        status, answer, headers = await client.call(chat(), path=path, key=key)
        assert status == expect, answer
        seen.extend([json.dumps(answer, ensure_ascii=False), json.dumps(dict(headers))])
        return answer

    with caplog.at_level(logging.DEBUG):
        client = await start(senv, doc, admin_key=ADMIN_KEY)
        # a: 500 echoing K1; b: 429 echoing K3; c: a reply quoting K4.
        answer = await call()
        assert "you sent" in answer["data"]["response"]["choices"][0]["message"]["content"]
        assert (len(a.requests), len(b.requests), len(c.requests)) == (1, 1, 1)
        # a: 500 echoing K2 (the keys take turns); c: 400 echoing K4, passed on.
        c.status = 400
        answer = await call("/v1/chat/completions", 400)
        assert "no (400) for key" in answer["error"]["message"]
        # a's third failure, the first from another user: it rests.
        answer = await call("/api/call.php", 502, key=BOB_KEY)
        assert answer["data"]["upstream_status"] == 400
        assert router(senv).channels["a"].resting_until > 0
        assert a.keys_sent() == [K1, K2, K1] and len(c.requests) == 3
        c.status = 200
        code, _, text = await stream_call(client, chat())
        assert code == 200 and "data: [DONE]" in text
        seen.append(text)
        # c's key is refused, for calls and its model list (the 401 echoes the key): the
        # background check disables it, logged by fingerprint.
        c.refused = {K4}
        answer = await call("/api/call.php", 502)
        assert answer["data"]["attempts"][-1]["status"] == 401
        await until(lambda: bool(key_state(senv, "c", K4).disabled), "c's key check")
        assert c.models_keys[-1] == K4
        # A reload brings in a new key, echoed too.
        d = fakes(status=500, echo_key=True)
        doc["upstreams"]["d"] = up(d, K5, priority=0)
        await rewrite(senv, doc)
        c.refused = set()
        answer = await call()
        assert len(d.requests) == 1 and answer["data"]["response"]["id"] != f"chatcmpl-{K4}"
        resp = await client.http.fetch(client.base + "/v1/models", headers={"X-API-Key": ALICE_KEY})
        seen.append(resp.body.decode())
        assert "model-" in seen[-1]
        seen.append(json.dumps(await scrape(client)))
        admin = Admin(client)
        await admin.login()
        seen.append((await admin.request("/admin/api/state"))[1])
        seen.append((await admin.request("/admin"))[1])
        await senv.stop()
    logs = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "refused key" in logs and gateway.key_fingerprint(K4) in logs
    stored = data_text(senv.data_dir)
    for secret in ROUTE_KEYS:
        assert secret not in logs, secret
        assert secret not in stored, secret
        for text in seen:
            assert secret not in text, (secret, text[:300])
    assert "canary" not in (logs + stored + "".join(seen)).lower()


# ---------------------------------------------------------------- 15. parse_routing, at random

ENV = {"KEY_ENV_SET": "sk-from-env"}
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 200_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_URLS = ["http://127.0.0.1:1/v1", "https://up.test/v1/", "ftp://x", "http://", "http://[::1"]
# Per setting: values near the edges of what it accepts, and anything at all.
_FIELD_VALUES = {
    "base_url": st.sampled_from([*_URLS, "http://x:99999/v1", "http://[", "//x/v1"]),
    "api_key": st.sampled_from(["sk-a", "sk b", "", "sk-\u00e9"]),
    "api_key_env": st.sampled_from(["KEY_ENV_SET", "NOT_SET", ""]),
    "api_keys": st.lists(st.sampled_from(["sk-a", "sk-a", "sk-b", " "]), max_size=3),
    "api_keys_env": st.lists(st.sampled_from(["KEY_ENV_SET", "NOT_SET"]), max_size=3),
    "models": st.lists(st.sampled_from(["*", "gpt-[4", "a]", "x?", "[!a]*", ""]), max_size=3),
    "priority": st.integers(-2, 1002),
    "weight": st.integers(-1, 10_001) | st.floats(),
    "max_concurrency": st.integers(-1, 100_001),
    "timeout": st.floats(-1, 90_000) | st.sampled_from([".inf", "1"]),
    "headers": st.dictionaries(
        st.sampled_from(["X-A", "Authorization", "bad name", "Host"]),
        st.sampled_from(["v", "", "\u00e9", "x" * 600]) | _values,
        max_size=2,
    ),
    "api": st.sampled_from(["openai", "anthropic", "gemini"]),
    "bogus": _values,
}
_upstream_change = st.tuples(
    st.just("upstream"),
    st.sampled_from(["a", "b", "c d", "_x"]),
    st.sampled_from(sorted(_FIELD_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), _FIELD_VALUES[k] | _values)
    ),
)
_model_change = st.tuples(
    st.just("model"),
    st.sampled_from(["fast", "gpt-3.5-turbo", ""]),
    st.one_of(
        _values,
        st.sampled_from(["deepseek-chat", "a" * 201]),
        st.fixed_dictionaries(
            {"model": st.sampled_from(["m", ""]) | _values},
            optional={"upstream": st.sampled_from(["a", "b", "nowhere", ""]) | _values},
        ),
    ),
)
_top_change = st.tuples(
    st.just("top"),
    st.sampled_from(["retries", "cooldown_seconds", "models", "upstreams", "bogus"]),
    st.integers(-1, 12) | st.floats() | _values,
)


def _document(changes: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    """A good upstreams.yaml with a few settings changed."""
    doc: dict[str, Any] = {
        "upstreams": {
            "a": {"base_url": "http://127.0.0.1:1/v1", "api_key": "sk-a"},
            "b": {"base_url": "http://127.0.0.1:2/v1", "api_keys_env": ["KEY_ENV_SET"]},
        },
        "models": {"fast": {"model": "m", "upstream": "a"}, "gpt-3.5-turbo": "deepseek-chat"},
        "retries": 2,
    }
    for where, name, value in changes:
        if where == "top":
            doc[name] = value
        elif where == "model" and isinstance(doc["models"], dict):
            doc["models"][name] = value
        elif where == "upstream" and isinstance(doc["upstreams"], dict):
            entry = doc["upstreams"].setdefault(name, {"base_url": "http://x/v1", "api_key": "k"})
            if isinstance(entry, dict):
                entry[value[0]] = value[1]
    return doc


_text = st.one_of(
    st.lists(_upstream_change | _model_change | _top_change, min_size=1, max_size=3).map(
        lambda changes: yaml.safe_dump(_document(changes), allow_unicode=True)
    ),
    # What safe_dump never writes: plain scalars YAML resolves by itself, tags, anchors.
    st.sampled_from(["2020-02-30", "2020-13-45", "!!binary YQ==", "&x [*x]", "0o8", "1e999"]).map(
        lambda raw: yaml.safe_dump(_document([])) + f"cooldown_seconds: {raw}\n"
    ),
    st.text(max_size=60),
)


# parse_routing returns a spec or raises ConfigError for any text (the examples once raised
# ValueError, TypeError or RecursionError: a traceback at start, in `upstreams check`, and
# "periodic task failed" on a reload).
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(_text)
@example('upstreams: {a: {base_url: "http://[::1", api_key: k}}')
@example("upstreams: {a: {base_url: 'http://x/v1', api_key: k}}\nmodels: {m: {upstream: [1]}}")
@example("upstreams: {a: {base_url: 'http://x/v1', api_key: k}}\nretries: 2020-13-45")
def test_parse_routing_returns_a_spec_or_a_config_error(text: str) -> None:
    try:
        spec = gateway.parse_routing(text, ENV, gateway.Config())
    except gateway.ConfigError as e:
        assert str(e)
        return
    assert isinstance(spec, gateway.RoutingSpec)
    assert spec.upstreams and spec.from_file
    names = {u.name for u in spec.upstreams}
    for target, pinned in spec.aliases.values():
        assert isinstance(target, str) and (not pinned or pinned in names)
    for u in spec.upstreams:
        assert u.keys and 1 <= u.weight and 0 <= u.priority
        assert u.base_url.startswith(("http://", "https://"))


CRASHERS = {
    # urllib.parse.urlsplit raises ValueError("Invalid IPv6 URL") before any check
    "ipv6-url": 'upstreams: {a: {base_url: "http://[::1", api_key: k}}',
    # `upstream not in names` with an unhashable value: TypeError
    "unhashable-pin": (
        "upstreams: {a: {base_url: 'http://x/v1', api_key: k}}\n"
        "models: {m: {model: x, upstream: [1]}}"
    ),
    # yaml.safe_load's timestamp resolver: ValueError("month must be in 1..12")
    "bad-date": "upstreams: {a: {base_url: 'http://x/v1', api_key: k}}\nretries: 2020-13-45",
    # PyYAML's composer recurses: RecursionError
    "deep-nesting": "upstreams: " + "[" * 3000,
}


# Each of these files once made parse_routing raise something other than ConfigError.
@pytest.mark.parametrize("text", list(CRASHERS.values()), ids=list(CRASHERS))
def test_parse_routing_crashers(text: str) -> None:
    with pytest.raises(gateway.ConfigError):
        gateway.parse_routing(text, {}, gateway.Config())


# A key written twice is refused, as in users.yaml: an upstream named twice would otherwise
# lose its first definition, keys and all, without a word.
def test_duplicate_keys_are_refused() -> None:
    text = (
        "upstreams:\n"
        "  a: {base_url: 'http://x/v1', api_key: k1}\n"
        "  a: {base_url: 'http://y/v1', api_key: k2}\n"
    )
    with pytest.raises(gateway.ConfigError, match="duplicate"):
        gateway.parse_routing(text, {}, gateway.Config())


# A port outside 1-65535 (or not a number) is refused when the file is read: at call time it
# would fail outside the failover rules (Tornado raises OverflowError, not a connect error).
@pytest.mark.parametrize("port", ["99999", "abc"])
def test_a_bad_port_is_refused(port: str) -> None:
    text = f"upstreams: {{a: {{base_url: 'http://127.0.0.1:{port}/v1', api_key: k}}}}"
    with pytest.raises(gateway.ConfigError, match=r"upstreams\.a\.base_url"):
        gateway.parse_routing(text, {}, gateway.Config())
