"""Daily limits: exact under concurrency, 429 envelope, failures cost nothing."""

from __future__ import annotations

import asyncio

from conftest import ALICE_KEY, VALID, Env


async def test_exact_request_limit_with_120_released_at_once(env: Env) -> None:
    env.upstream.delay = 0.05  # keep calls in flight while the others arrive
    client = await env.start(concurrency=200, queue_size=200)
    results = await asyncio.gather(*(client.call(VALID) for _ in range(120)))
    codes = [r[0] for r in results]
    assert codes.count(200) == 20
    assert codes.count(429) == 100
    assert len(env.upstream.requests) == 20
    used = sorted(r[1]["data"]["daily_limits"]["requests"]["used"] for r in results if r[0] == 200)
    assert used[-1] == 20
    stats = (await client.status())["stats"]
    assert (stats["today_requests"], stats["today_tokens"]) == (20, 300)


async def test_429_envelope_field_by_field(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    client = await env.start()
    for _ in range(2):
        assert (await client.call(VALID))[0] == 200
    status, doc, headers = await client.call(VALID)
    assert status == 429
    assert doc == {
        "success": False,
        "message": "每日请求次数已达上限",
        "data": {
            "daily_request_count": 2,
            "daily_request_limit": 2,
            "daily_token_count": 30,
            "daily_token_limit": 100000,
        },
    }
    # Asia/Shanghai midnight is at most a day away
    assert 1 <= int(headers["Retry-After"]) <= 86400
    assert len(env.upstream.requests) == 2


async def test_token_limit_admits_until_reached_then_refuses(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_token_limit": 40}})
    client = await env.start()
    # 15 tokens per call: 0 -> 15 -> 30 -> 45; a call is admitted while tokens < limit
    for expected in (15, 30, 45):
        status, doc, _ = await client.call(VALID)
        assert status == 200
        assert doc["data"]["daily_limits"]["tokens"] == {
            "used": expected,
            "limit": 40,
            "remaining": max(0, 40 - expected),
        }
    status, doc, _ = await client.call(VALID)
    assert status == 429
    assert doc["message"] == "每日Token用量已达上限"
    assert doc["data"]["daily_token_count"] == 45


async def test_failed_calls_free_their_slot(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 3}})
    client = await env.start()
    env.upstream.status = 500
    for _ in range(5):
        assert (await client.call(VALID))[0] == 502
    env.upstream.status = 200
    codes = [(await client.call(VALID))[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429]


async def test_concurrent_failures_and_successes_never_pass_the_limit(env: Env) -> None:
    """Half the calls fail upstream; slots they free go to others, successes stay <= limit."""
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 10}})
    client = await env.start(concurrency=100, queue_size=100)
    env.upstream.delay = 0.05
    env.upstream.status = 503
    first = await asyncio.gather(*(client.call(VALID) for _ in range(40)))
    assert {r[0] for r in first} == {502, 429}
    env.upstream.status = 200
    second = await asyncio.gather(*(client.call(VALID) for _ in range(40)))
    assert [r[0] for r in second].count(200) == 10
    assert (await client.status())["stats"]["today_requests"] == 10


async def test_limit_raised_in_users_yaml_applies_without_restart(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    assert (await client.call(VALID))[0] == 429
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    for _ in range(50):
        await asyncio.sleep(0.05)
        status, _, _ = await client.call(VALID)
        if status != 429:
            break
    assert status == 200
    assert (await client.call(VALID))[0] == 429
