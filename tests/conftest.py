"""Shared fixtures: a fake OpenAI-compatible upstream and gateways, real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.testing
import tornado.web
import yaml

import gateway

ROOT = Path(__file__).resolve().parent.parent
# Canary secrets: tests assert that none of them ever shows up in logs, responses or data/.
UPSTREAM_KEY = "sk-upstream-CANARY-9b1e4f7d2c"
ALICE_KEY = "sk-alice-CANARY-51c0ffee77aa"
BOB_KEY = "sk-bob-CANARY-0d15ea5e1234"
CAROL_KEY = "sk-carol-CANARY-feedface9876"
ALL_SECRETS = (UPSTREAM_KEY, ALICE_KEY, BOB_KEY, CAROL_KEY)


def users_yaml(users: dict[str, dict[str, Any]], defaults: dict[str, int] | None = None) -> str:
    return yaml.safe_dump({"defaults": defaults or {}, "users": users}, allow_unicode=True)


DEFAULT_USERS = {
    "alice": {"api_key": ALICE_KEY, "daily_request_limit": 20, "daily_token_limit": 100000},
    "bob": {"api_key": BOB_KEY, "enabled": False},
    # carol's key is stored only as its SHA-256
    "carol": {"api_key_sha256": __import__("hashlib").sha256(CAROL_KEY.encode()).hexdigest()},
}


# ---------------------------------------------------------------- fake upstream


@dataclass
class FakeUpstream:
    """An OpenAI-compatible server whose behaviour each test sets through attributes."""

    port: int = 0
    delay: float = 0.0
    status: int = 200
    body: bytes | None = None  # raw body to return instead of a chat completion
    usage: dict[str, Any] | None = field(
        default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    )
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    server: tornado.httpserver.HTTPServer | None = None
    # streams
    pieces: list[str] = field(default_factory=lambda: ["Hel", "lo", " wor", "ld"])
    stream_delay: float = 0.0  # seconds between chunks
    cut_after: int | None = None  # close the connection after this many chunks
    stream_finished: bool = False
    client_left: asyncio.Event = field(default_factory=asyncio.Event)
    models_calls: int = 0
    reset: bool = False  # reset the connection instead of answering

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class _ChatHandler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeUpstream) -> None:
        self.fake = fake

    def on_connection_close(self) -> None:
        self.fake.client_left.set()

    async def stream(self, request: dict[str, Any]) -> None:
        fake = self.fake
        self.set_header("Content-Type", "text/event-stream")
        chat = self.request.path.endswith("/chat/completions")
        for n, piece in enumerate(fake.pieces):
            if fake.cut_after is not None and n == fake.cut_after:
                self.request.connection.stream.close()  # type: ignore[union-attr]
                return
            last = n == len(fake.pieces) - 1
            choice = {"index": 0, "finish_reason": "stop" if last else None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [choice]}
            try:
                self.write(f"data: {json.dumps(chunk)}\n\n")
                await self.flush()
            except tornado.iostream.StreamClosedError:
                fake.client_left.set()
                return
            if fake.stream_delay:
                await asyncio.sleep(fake.stream_delay)
            if fake.client_left.is_set():
                return
        options = request.get("stream_options") or {}
        if options.get("include_usage") and fake.usage is not None:
            chunk = {"id": "chatcmpl-fake", "choices": [], "usage": fake.usage}
            self.write(f"data: {json.dumps(chunk)}\n\n")
        fake.stream_finished = True
        self.finish("data: [DONE]\n\n")

    async def get(self) -> None:
        self.fake.models_calls += 1
        self.finish(
            {
                "object": "list",
                "data": [{"id": "m1", "object": "model"}, {"id": "m2", "object": "model"}],
            }
        )

    async def post(self) -> None:
        fake = self.fake
        fake.requests.append((dict(self.request.headers), self.request.body))
        fake.in_flight += 1
        fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if fake.delay:
                await asyncio.sleep(fake.delay)
        finally:
            fake.in_flight -= 1
        if fake.reset:
            # An abrupt RST instead of an answer.
            sock = self.request.connection.stream.socket  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return
        self.set_status(fake.status)
        for k, v in fake.headers.items():
            self.set_header(k, v)
        if fake.body is not None:
            self.finish(fake.body)
            return
        if fake.status != 200:
            self.finish({"error": {"message": f"upstream says no ({fake.status})", "type": "x"}})
            return
        request = json.loads(self.request.body)
        if request.get("stream"):
            await self.stream(request)
            return
        if self.request.path.endswith("/embeddings"):
            self.finish(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": request.get("model"),
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
            return
        if self.request.path.endswith("/v1/completions"):
            reply = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "pong", "finish_reason": "stop"}],
            }
            if fake.usage is not None:
                reply["usage"] = fake.usage
            self.finish(reply)
            return
        reply: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "pong"},
                    "finish_reason": "stop",
                }
            ],
        }
        if fake.usage is not None:
            reply["usage"] = fake.usage
        self.finish(reply)


def serve_fake(fake: FakeUpstream) -> FakeUpstream:
    """Start a fake upstream on a free port of 127.0.0.1, in the running event loop."""
    app = tornado.web.Application(
        [(r"/v1/(?:chat/completions|completions|embeddings|models)", _ChatHandler, {"fake": fake})]
    )
    sock, fake.port = tornado.testing.bind_unused_port("127.0.0.1")
    fake.server = tornado.httpserver.HTTPServer(app)
    fake.server.add_sockets([sock])
    return fake


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = serve_fake(FakeUpstream())
    yield fake
    fake.server.stop()
    await fake.server.close_all_connections()


# ---------------------------------------------------------------- in-process gateways


class Clock:
    """An injectable clock for the gateway; starts at the real time."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@dataclass
class Client:
    """Talks HTTP to one gateway."""

    base: str
    http: tornado.httpclient.AsyncHTTPClient

    async def call(
        self,
        body: Any = None,
        *,
        key: str | None = ALICE_KEY,
        path: str = "/api/call.php",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> tuple[int, dict[str, Any], Any]:
        if body is None and raw is None:
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "ping"}]}
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["X-API-Key"] = key
        data = raw if raw is not None else json.dumps(body).encode()
        resp = await self.http.fetch(
            self.base + path,
            method=method,
            body=data if method == "POST" else None,
            headers=h,
            raise_error=False,
            request_timeout=60,
        )
        assert resp.code != 599, resp.error
        return resp.code, json.loads(resp.body), resp.headers

    async def status(self) -> dict[str, Any]:
        resp = await self.http.fetch(self.base + "/api/status.php", raise_error=False)
        assert resp.code == 200, resp.body
        return json.loads(resp.body)["data"]


@dataclass
class Env:
    tmp: Path
    upstream: FakeUpstream
    clock: Clock
    http_client: str = "simple"
    gateways: list[gateway.Gateway] = field(default_factory=list)
    http: tornado.httpclient.AsyncHTTPClient = field(
        default_factory=lambda: tornado.httpclient.AsyncHTTPClient(
            force_instance=True, max_clients=500
        )
    )

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def users_file(self) -> Path:
        return self.tmp / "users.yaml"

    def write_users(self, users: dict[str, dict[str, Any]] | None = None, **defaults: int) -> None:
        self.users_file.write_text(users_yaml(users or DEFAULT_USERS, defaults or None))

    def config(self, **overrides: Any) -> gateway.Config:
        base = dict(
            host="127.0.0.1",
            port=0,
            users_file=str(self.users_file),
            data_dir=str(self.data_dir),
            upstream_base_url=self.upstream.url,
            upstream_api_key=UPSTREAM_KEY,
            upstream_timeout=5.0,
            reload_interval=0.1,
            timezone="Asia/Shanghai",
            http_client=self.http_client,
        )
        base.update(overrides)
        return gateway.Config(**base)

    async def start(self, **overrides: Any) -> Client:
        if not self.users_file.exists():
            self.write_users()
        gw = gateway.Gateway(self.config(**overrides), now=self.clock)
        sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
        await gw.start(sockets=[sock])
        self.gateways.append(gw)
        return Client(f"http://127.0.0.1:{gw.port}", self.http)

    async def stop(self, gw: gateway.Gateway | None = None) -> None:
        for g in [gw] if gw else list(self.gateways):
            self.gateways.remove(g)
            await g.stop()


@pytest.fixture
async def penv(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Env]:
    """An Env for tests of gateway processes, which pick their client themselves."""
    e = Env(tmp_path, upstream, Clock(), "auto")
    yield e
    e.http.close()


@pytest.fixture
async def senv(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Env]:
    """An Env for tests where the upstream client does not matter: run once, with "simple"."""
    e = Env(tmp_path, upstream, Clock(), "simple")
    yield e
    for g in list(e.gateways):
        await e.stop(g)
    e.http.close()


@pytest.fixture(params=[pytest.param("curl", marks=pytest.mark.slow), "simple"])
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> AsyncIterator[Env]:
    """A test directory with a fake upstream; runs each test once per upstream HTTP client."""
    e = Env(tmp_path, upstream, Clock(), request.param)
    yield e
    for g in list(e.gateways):
        await e.stop(g)
    e.http.close()


def data_text(data_dir: Path) -> str:
    """Everything under data/, as text, for secret scans."""
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in data_dir.rglob("*") if p.is_file()
    )


# ---------------------------------------------------------------- gateway subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """`python gateway.py` as a real process, with its log in a file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        umask: int = -1,  # -1: the test process's own
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "ab")  # closed in wait() or by the fixture
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "gateway.py"), f"--port={self.port}", *args],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            umask=umask,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 10.0) -> None:
        http = tornado.httpclient.AsyncHTTPClient()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log_path.read_text()}")
            try:
                resp = await http.fetch(self.base + "/api/status.php", raise_error=False)
                if resp.code == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"gateway not ready: {self.log_path.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("gateway did not exit")
            await asyncio.sleep(0.02)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def procs() -> Callable[..., Proc]:
    started: list[Proc] = []

    def start(
        args: list[str], log_path: Path, env: dict[str, str] | None = None, umask: int = -1
    ) -> Proc:
        p = Proc(args, log_path, env, umask)
        started.append(p)
        return p

    yield start  # type: ignore[misc]
    for p in started:
        p.kill()
        p.proc.wait(timeout=10)
        p.log.close()


@pytest.fixture
async def demo(procs: Callable[..., Proc], tmp_path: Path) -> Proc:
    p = procs(
        ["--demo", "--host=127.0.0.1", f"--data-dir={tmp_path / 'data'}"], tmp_path / "demo.log"
    )
    await p.ready()
    return p


def proc_args(e: Env, *extra: str) -> list[str]:
    if not e.users_file.exists():
        e.write_users()
    return [
        "--host=127.0.0.1",
        f"--users-file={e.users_file}",
        f"--data-dir={e.data_dir}",
        f"--upstream-base-url={e.upstream.url}",
        "--timezone=Asia/Shanghai",
        "--reload-interval=0.2",
        *extra,
    ]


# ---------------------------------------------------------------- helpers for process tests

KEY_ENV = {"UPSTREAM_API_KEY": UPSTREAM_KEY}
VALID = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}


async def post(
    http: tornado.httpclient.AsyncHTTPClient, base: str, key: str = ALICE_KEY
) -> tuple[int, dict]:
    try:
        resp = await http.fetch(
            base + "/api/call.php",
            method="POST",
            body=json.dumps(VALID),
            headers={"X-API-Key": key, "Content-Type": "application/json"},
            raise_error=False,
            request_timeout=30,
        )
    except (OSError, tornado.httpclient.HTTPClientError):
        return 599, {}  # no answer: the process died under this call
    if resp.code == 599:
        return 599, {}
    return resp.code, json.loads(resp.body)


async def status(http: tornado.httpclient.AsyncHTTPClient, base: str) -> dict:
    resp = await http.fetch(base + "/api/status.php")
    return json.loads(resp.body)["data"]["stats"]


def assert_data_parses(data_dir: Path) -> None:
    """Every file under data/ parses: snapshots whole, journals line by line."""
    for path in data_dir.glob("*.json"):
        json.loads(path.read_text())
    for path in data_dir.glob("*.jsonl"):
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        for line in complete.split("\n"):
            if line:
                json.loads(line)
