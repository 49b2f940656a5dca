"""Alerts to webhooks: a user passing 80% and 100% of a daily limit (once per user, limit,
threshold and day), upstreams resting or back; JSON or the chat services' formats (Feishu,
DingTalk, WeCom, Slack) with a readable Chinese message; signed with --alert-secret; delivered
in the background with retries, surviving a restart; a dead receiver costs the calls nothing;
no alert carries a key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from conftest import ALICE_KEY, UPSTREAM_KEY, Env, free_port

import gateway

SECRET = "alert-secret-0123456789"


@dataclass
class Receiver:
    port: int = 0
    posts: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    server: Any = None

    def url(self, fmt: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/hook" + (f"#{fmt}" if fmt else "")

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, _ in self.posts]


class _Hook(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def post(self) -> None:
        self.receiver.posts.append(
            (dict(self.request.headers), self.request.body, self.request.query)
        )
        self.finish({"ok": True})


def serve_receiver(port: int = 0) -> Receiver:
    receiver = Receiver()
    app = tornado.web.Application([(r"/hook", _Hook, {"receiver": receiver})])
    if port:
        sock = tornado.netutil.bind_sockets(port, "127.0.0.1")[0]
    else:
        sock, port = tornado.testing.bind_unused_port("127.0.0.1")
    receiver.port = port
    receiver.server = tornado.httpserver.HTTPServer(app)
    receiver.server.add_sockets([sock])
    return receiver


async def until(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_limit_alerts_fire_once_each_and_are_signed(senv: Env) -> None:
    receiver = serve_receiver()
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 5}})
    client = await senv.start(alert_webhook=receiver.url(), alert_secret=SECRET)
    for _ in range(8):  # 5 charged, 3 refused
        await client.call()
    await until(lambda: len(receiver.posts) >= 2)
    await asyncio.sleep(0.3)  # nothing more comes
    docs = receiver.docs()
    assert [(d["event"], d["limit"], d["percent"], d["used"]) for d in docs] == [
        ("limit", "requests", 80, 4),
        ("limit", "requests", 100, 5),
    ]
    assert docs[0]["user"] == "alice" and docs[0]["max"] == 5 and docs[0]["day"]
    assert set(docs[0]) >= {"event", "time", "user", "limit", "used", "day", "detail"}
    for headers, body, _ in receiver.posts:
        mac = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Gateway-Signature"] == f"sha256={mac}"
        for secret in (ALICE_KEY, UPSTREAM_KEY, SECRET):
            assert secret.encode() not in body
    # A second gateway process on the same data dir does not fire them again.
    await senv.stop()
    client = await senv.start(alert_webhook=receiver.url(), alert_secret=SECRET)
    await client.call()
    await asyncio.sleep(0.3)
    assert len(receiver.posts) == 2
    receiver.server.stop()


@pytest.mark.parametrize("fmt", ["feishu", "dingtalk", "wecom", "slack"])
async def test_the_chat_formats(senv: Env, fmt: str) -> None:
    receiver = serve_receiver()
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await senv.start(alert_webhook=receiver.url(fmt), alert_secret=SECRET)
    await client.call()
    await until(lambda: len(receiver.posts) >= 2)  # 80% and 100% at once
    _, body, query = receiver.posts[0]
    doc = json.loads(body)
    if fmt == "feishu":
        text = doc["content"]["text"]
        key = f"{doc['timestamp']}\n{SECRET}".encode()
        sign = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
        assert doc["msg_type"] == "text" and doc["sign"] == sign
    elif fmt in ("dingtalk", "wecom"):
        text = doc["text"]["content"]
        assert doc["msgtype"] == "text"
        if fmt == "dingtalk":
            params = urllib.parse.parse_qs(query)
            stamp = params["timestamp"][0]
            mac = hmac.new(SECRET.encode(), f"{stamp}\n{SECRET}".encode(), "sha256").digest()
            assert params["sign"][0] == base64.b64encode(mac).decode()
    else:
        text = doc["text"]
    assert "用户 alice 今日请求数已达上限的 80%" in text
    receiver.server.stop()


async def test_a_dead_receiver_costs_nothing_and_alerts_survive_a_restart(senv: Env) -> None:
    port = free_port()  # nobody listens yet
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    url = f"http://127.0.0.1:{port}/hook"
    client = await senv.start(alert_webhook=url)
    t0 = time.monotonic()
    for _ in range(2):
        assert (await client.call())[0] == 200
    assert time.monotonic() - t0 < 2  # the calls did not wait for the webhook
    await asyncio.sleep(0.2)
    pending = (senv.data_dir / "alerts" / "pending.jsonl").read_text().splitlines()
    assert len(pending) == 2
    await senv.stop()
    receiver = serve_receiver(port)
    await senv.start(alert_webhook=url)
    await until(lambda: len(receiver.posts) == 2)
    assert [d["percent"] for d in receiver.docs()] == [80, 100]
    await until(lambda: not (senv.data_dir / "alerts" / "pending.jsonl").read_text())
    receiver.server.stop()


async def test_an_upstream_resting_is_an_alert(senv: Env) -> None:
    receiver = serve_receiver()
    bob = "sk-bob-alerts-00001"
    senv.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": bob}})
    senv.upstream.status = 500
    routing = senv.tmp / "upstreams.yaml"
    routing.write_text(
        f"upstreams:\n  a: {{base_url: '{senv.upstream.url}', api_key: {UPSTREAM_KEY}}}\n"
    )
    client = await senv.start(alert_webhook=receiver.url(), upstreams_file=str(routing))
    for key in (ALICE_KEY, bob, ALICE_KEY):
        assert (await client.call(key=key))[0] == 502
    await until(lambda: any(d["event"] == "upstream_resting" for d in receiver.docs()))
    doc = next(d for d in receiver.docs() if d["event"] == "upstream_resting")
    assert doc["upstream"] == "a" and "休息" in doc["detail"]
    assert UPSTREAM_KEY.encode() not in b"".join(body for _, body, _ in receiver.posts)
    receiver.server.stop()


def test_bad_alert_settings_stop_the_start() -> None:
    for argv in (
        ["--alert-webhook=ftp://x"],
        ["--alert-webhook=http://x#teams"],
        ["--alert-format=x"],
    ):
        with pytest.raises(gateway.ConfigError):
            gateway.parse_config(argv, {})


async def test_a_users_429s_raise_one_key_alert_a_minute_and_none_for_no_rest(
    senv: Env,
) -> None:
    """An upstream's 429 can answer one user's oversized request: a rest shorter than a second
    is no alert, and the same key resting again within a minute is not told twice."""
    receiver = serve_receiver()
    senv.write_users({"alice": {"api_key": ALICE_KEY}})
    senv.upstream.status = 429
    routing = senv.tmp / "upstreams.yaml"
    routing.write_text(
        f"upstreams:\n  a: {{base_url: '{senv.upstream.url}', api_key: {UPSTREAM_KEY}}}\n"
        "cooldown_seconds: 0\n"
    )
    client = await senv.start(alert_webhook=receiver.url(), upstreams_file=str(routing))
    for _ in range(5):  # no Retry-After and a cooldown of 0: no rest, no alert
        await client.call()
    await asyncio.sleep(0.3)
    assert receiver.posts == []
    senv.upstream.headers["Retry-After"] = "0.05"  # rests shorter than a second: still none
    for _ in range(3):
        await client.call()
        await asyncio.sleep(0.1)
    senv.upstream.headers["Retry-After"] = "2"
    for _ in range(3):
        await client.call()
        await asyncio.sleep(2.1)  # rested and back, three times
    await until(lambda: len(receiver.posts) >= 1)
    await asyncio.sleep(0.3)
    assert [d["event"] for d in receiver.docs()] == ["upstream_key_resting"]
    receiver.server.stop()


async def test_chat_alerts_never_carry_the_upstreams_words(senv: Env) -> None:
    receiver = serve_receiver()
    bob = "sk-bob-alerts-00002"
    senv.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": bob}})
    senv.upstream.status = 500
    senv.upstream.body = b'{"error": {"message": "bad model <!channel> <at user_id=\\"all\\">"}}'
    routing = senv.tmp / "upstreams.yaml"
    routing.write_text(
        f"upstreams:\n  a: {{base_url: '{senv.upstream.url}', api_key: {UPSTREAM_KEY}}}\n"
    )
    client = await senv.start(alert_webhook=receiver.url("slack"), upstreams_file=str(routing))
    for key in (ALICE_KEY, bob, ALICE_KEY):
        await client.call(key=key)
    await until(lambda: len(receiver.posts) >= 1)
    text = receiver.docs()[0]["text"]
    assert "休息" in text and "500" in text
    assert "<" not in text and "channel" not in text


async def test_the_deliverer_outlives_a_full_queue(
    senv: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alerts dropped from a full queue while one is being sent do not end delivery."""
    monkeypatch.setattr(gateway, "ALERT_PENDING_MAX", 3)
    receiver = serve_receiver()
    slow = asyncio.Event()
    original = _Hook.post

    async def held(self: _Hook) -> None:  # the first delivery waits until the queue overflowed
        await slow.wait()
        original(self)

    monkeypatch.setattr(_Hook, "post", held)
    senv.write_users({"alice": {"api_key": ALICE_KEY}})
    await senv.start(alert_webhook=receiver.url())
    alerts = senv.gateways[0].service.alerts  # type: ignore[union-attr]
    for n in range(10):
        alerts.emit("test", f"alert {n}")
        await asyncio.sleep(0.01)
    slow.set()
    await until(lambda: not alerts.pending)
    assert alerts._task is not None and not alerts._task.done()
    alerts.emit("test", "after")
    await until(lambda: any(d.get("detail") == "after" for d in receiver.docs()))
    receiver.server.stop()


def test_webhook_tokens_are_redacted_like_keys() -> None:
    slack = "https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/abcdefGHIJKL0123456789xy"
    ding = "https://oapi.dingtalk.com/robot/send?access_token=" + "ab12" * 16
    wecom = (
        "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"
    )
    config = gateway.Config(alert_webhook=f"{slack}#slack,{ding}#dingtalk,{wecom}#wecom")
    redactor = gateway.Redactor(config.secrets())
    tokens = ["abcdefGHIJKL0123456789xy", "ab12" * 16, "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"]
    for url in (slack, ding, wecom):
        line = redactor.text(f"POST {url} failed: HTTP 599")
        assert not [t for t in tokens if t in line], line
        assert "failed: HTTP 599" in line
    # ...and the log guard installed from that configuration withholds them too.
    assert set(tokens) <= set(config.secrets())
    # Ordinary words of a URL are not secrets: the host and short segments stay readable.
    assert "hooks.slack.com/services" in redactor.text(f"POST {slack}")


async def test_the_file_store_failing_and_back_are_alerts(senv: Env) -> None:
    receiver = serve_receiver()
    client = await senv.start(alert_webhook=receiver.url())
    assert (await client.call())[0] == 200
    journal = senv.data_dir / f"{senv.gateways[0].clock.today()}.jsonl"
    # chattr +i: not even root may write, through the gateway's open file too
    if subprocess.run(["chattr", "+i", str(journal)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable attribute (chattr +i)")
    try:
        for _ in range(3):
            assert (await client.call())[0] == 500
        await until(lambda: [d["event"] for d in receiver.docs()] == ["store_failed"])
    finally:
        subprocess.run(["chattr", "-i", str(journal)], check=True)
    assert (await client.call())[0] == 200
    await until(lambda: [d["event"] for d in receiver.docs()] == ["store_failed", "store_back"])
    failed, back = receiver.docs()
    assert "file:" in failed["detail"] and "PermissionError" in failed["detail"]
    assert "已恢复" in back["detail"]
    receiver.server.stop()
