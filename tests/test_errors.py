"""Every row of the contract's status-code table, plus 404/405/413/500: JSON, and free of charge."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from conftest import ALICE_KEY, BOB_KEY, UPSTREAM_KEY, VALID, Env, free_port

BAD_BODIES = [
    (b"", "not valid JSON"),
    (b"{bad json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b'{"model": "m", "messages": [{"role": "user"}], "temperature": NaN}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user"}], "temperature": Infinity}', "Infinity"),
    (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 1e999}', "out of range"),
    (b'{"model": "m", "messages": [{"role": "user"}], "n": 1' + b"0" * 5000 + b"}", "not valid"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "'model'"),
    (b'{"model": "", "messages": [{"role": "user", "content": "hi"}]}', "'model'"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}', "'model'"),
    (b'{"model": "m"}', "'messages'"),
    (b'{"model": "m", "messages": []}', "'messages'"),
    (b'{"model": "m", "messages": "hi"}', "'messages'"),
    (b'{"model": "m", "messages": ["hi"]}', "every item of 'messages'"),
    (b'{"model": "m", "messages": [{"role": "user"}], "stream": true}', "stream"),
]


async def assert_nothing_charged(env: Env, client_base: str) -> None:
    resp = await env.http.fetch(client_base + "/api/status.php")
    stats = json.loads(resp.body)["data"]["stats"]
    assert (stats["today_requests"], stats["today_tokens"]) == (0, 0)


@pytest.mark.parametrize(("raw", "detail"), BAD_BODIES)
async def test_400_bad_body(env: Env, raw: bytes, detail: str) -> None:
    client = await env.start()
    status, doc, _ = await client.call(raw=raw)
    assert status == 400
    assert doc["success"] is False
    assert doc["message"] == "请求参数错误"
    assert detail in doc["data"]["error"]
    assert env.upstream.requests == []
    await assert_nothing_charged(env, client.base)


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        (None, "missing"),
        ("", "missing"),
        ("sk-nobody", "unknown or disabled"),
        (BOB_KEY, "disabled"),
    ],
)
async def test_401_missing_unknown_or_disabled_key(env: Env, key: str | None, detail: str) -> None:
    client = await env.start()
    status, doc, _ = await client.call(VALID, key=key)
    assert status == 401
    assert doc["message"] == "API Key无效或缺失"
    assert detail in doc["data"]["error"]
    assert env.upstream.requests == []


async def test_401_comes_before_body_validation(env: Env) -> None:
    client = await env.start()
    status, _, _ = await client.call(raw=b"not json", key=None)
    assert status == 401


async def test_500_without_upstream_key(env: Env) -> None:
    client = await env.start(upstream_api_key="")
    status, doc, _ = await client.call(VALID)
    assert status == 500
    assert doc["message"] == "系统配置错误"
    assert "upstream API key" in doc["data"]["error"]
    assert env.upstream.requests == []
    await assert_nothing_charged(env, client.base)


async def test_502_upstream_unreachable(env: Env) -> None:
    client = await env.start(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1")
    status, doc, _ = await client.call(VALID)
    assert status == 502
    assert doc["message"] == "大模型API调用失败"
    assert doc["data"]["upstream_status"] is None
    assert doc["data"]["error"].startswith("connection failed: ")
    await assert_nothing_charged(env, client.base)


async def test_502_upstream_timeout_is_honoured(env: Env) -> None:
    env.upstream.delay = 3.0
    client = await env.start(upstream_timeout=0.3)
    t0 = asyncio.get_running_loop().time()
    status, doc, _ = await client.call(VALID)
    elapsed = asyncio.get_running_loop().time() - t0
    assert status == 502
    assert doc["data"]["upstream_status"] is None
    assert doc["data"]["error"].startswith("timeout: ")
    assert elapsed < 1.3
    await assert_nothing_charged(env, client.base)


@pytest.mark.parametrize("upstream_status", [400, 401, 429, 500, 503])
async def test_502_upstream_non_2xx_carries_its_status_and_message(
    env: Env, upstream_status: int
) -> None:
    env.upstream.status = upstream_status
    client = await env.start()
    status, doc, _ = await client.call(VALID)
    assert status == 502
    assert doc["message"] == "大模型API调用失败"
    assert doc["data"] == {
        "upstream_status": upstream_status,
        "error": f"upstream says no ({upstream_status})",
    }
    await assert_nothing_charged(env, client.base)


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"[1, 2]", b""])
async def test_502_upstream_body_not_json_object(env: Env, body: bytes) -> None:
    env.upstream.body = body
    client = await env.start()
    status, doc, _ = await client.call(VALID)
    assert status == 502
    assert doc["data"]["upstream_status"] == 200
    assert "not a JSON object" in doc["data"]["error"]
    await assert_nothing_charged(env, client.base)


async def test_502_upstream_error_never_echoes_a_key(env: Env) -> None:
    env.upstream.status = 401
    env.upstream.body = json.dumps(
        {"error": {"message": "Incorrect API key provided: sk-upstr****4f7d2c or " + UPSTREAM_KEY}}
    ).encode()
    client = await env.start()
    status, doc, _ = await client.call(VALID)
    assert status == 502
    assert "CANARY" not in json.dumps(doc)
    assert "sk-upstr" not in json.dumps(doc)
    assert "[redacted]" in doc["data"]["error"]


async def test_503_queue_full_costs_nothing(env: Env) -> None:
    env.upstream.delay = 0.5
    # One user may fill the whole room here (the per-user share is tested in test_policy).
    client = await env.start(concurrency=1, queue_size=2, user_queue_share=1.0)
    results = await asyncio.gather(*(client.call(VALID) for _ in range(8)))
    codes = sorted(r[0] for r in results)
    assert codes == [200, 200, 200, 503, 503, 503, 503, 503]
    full = next(r for r in results if r[0] == 503)
    assert full[1]["message"] == "队列已满"
    assert full[1]["data"] == {"queue_length": 2, "queue_size": 2}
    assert full[2]["Retry-After"] == "1"
    data = await client.status()
    assert data["stats"]["today_requests"] == 3
    assert env.upstream.max_in_flight == 1


async def test_queue_off_serves_up_to_concurrency_and_refuses_the_rest(env: Env) -> None:
    env.upstream.delay = 0.3
    client = await env.start(concurrency=2, queue_size=0)
    results = await asyncio.gather(*(client.call(VALID) for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 200, 503, 503, 503]


async def test_404_and_405_are_json(env: Env) -> None:
    client = await env.start()
    for method, path, code, message in [
        ("GET", "/", 404, "接口不存在"),
        ("POST", "/api/nothing.php", 404, "接口不存在"),
        ("GET", "/api/call.php", 405, "请求方法不允许"),
        ("POST", "/api/status.php", 405, "请求方法不允许"),
    ]:
        status, doc, headers = await client.call(VALID, path=path, method=method)
        assert (status, doc["success"], doc["message"]) == (code, False, message)
        assert headers["Content-Type"].startswith("application/json")


async def test_413_body_over_limit_answered_without_reading_it(env: Env) -> None:
    client = await env.start(max_body_size=1000)
    status, doc, _ = await client.call(raw=b'{"model": "m", "pad": "' + b"x" * 2000 + b'"}')
    assert status == 413
    assert doc["message"] == "请求体过大"
    assert doc["data"] == {"max_body_size": 1000}
    # A client announcing 1 GB gets its answer at once, without sending the body.
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/call.php HTTP/1.1\r\nHost: x\r\nX-API-Key: "
        + ALICE_KEY.encode()
        + b"\r\nContent-Length: 1000000000\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413")
    assert "请求体过大".encode() in answer
    await assert_nothing_charged(env, client.base)


async def test_413_chunked_body_over_limit(env: Env) -> None:
    client = await env.start(max_body_size=1000)
    port = int(client.base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    chunk = b"x" * 600
    sock.sendall(
        b"POST /api/call.php HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + f"X-API-Key: {ALICE_KEY}\r\n\r\n".encode()
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2
    )
    answer = await asyncio.get_running_loop().run_in_executor(None, sock.recv, 4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413")


async def test_uncaught_exception_is_a_json_500_and_logged(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await env.start()
    service = env.gateways[0].service
    assert service is not None

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "status", broken)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        resp = await env.http.fetch(client.base + "/api/status.php", raise_error=False)
    assert resp.code == 500
    assert json.loads(resp.body) == {
        "success": False,
        "message": "系统内部错误",
        "data": {"error": "internal error; see the gateway log"},
    }
    assert any("uncaught exception in GET /api/status.php" in r.message for r in caplog.records)
