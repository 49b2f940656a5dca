"""Slow or half-open clients are cut off by timeouts and do not hold up others; --fsync works."""

from __future__ import annotations

import asyncio
import json

from conftest import ALICE_KEY, VALID, Env


async def test_slow_headers_and_slow_bodies_are_cut_off(env: Env) -> None:
    client = await env.start(idle_timeout=0.5, body_timeout=0.5)
    port = int(client.base.rsplit(":", 1)[1])
    slow_header = await asyncio.open_connection("127.0.0.1", port)
    slow_header[1].write(b"POST /api/call.php HTTP/1.1\r\nHost: x\r\n")  # never finishes
    slow_body = await asyncio.open_connection("127.0.0.1", port)
    slow_body[1].write(
        b"POST /api/call.php HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        + f"X-API-Key: {ALICE_KEY}\r\n\r\n{{".encode()  # a valid key: the body is awaited
    )
    # others are served meanwhile
    for _ in range(5):
        assert (await client.call(VALID))[0] == 200
    t0 = asyncio.get_running_loop().time()
    for reader, _ in (slow_header, slow_body):
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
    assert asyncio.get_running_loop().time() - t0 < 2


async def test_deeply_nested_json_is_a_400(env: Env) -> None:
    client = await env.start()
    status, doc, _ = await client.call(raw=b"[" * 100000 + b"]" * 100000)
    assert status == 400
    assert doc["message"] == "请求参数错误"


async def test_fsync_mode_charges_every_concurrent_call(env: Env) -> None:
    client = await env.start(fsync=True, concurrency=50)
    results = await asyncio.gather(*(client.call(VALID) for _ in range(20)))
    assert [r[0] for r in results] == [200] * 20
    used = sorted(r[1]["data"]["daily_limits"]["requests"]["used"] for r in results)
    assert used[-1] == 20
    day = env.gateways[0].clock.today()
    journal = (env.data_dir / f"{day}.jsonl").read_text()
    assert sum(1 for line in journal.split("\n") if line and json.loads(line)["k"] == "s") == 20
