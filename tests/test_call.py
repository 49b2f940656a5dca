"""POST /api/call.php and GET /api/status.php: the contract's envelopes, field by field."""

from __future__ import annotations

import hashlib
import json

from conftest import ALICE_KEY, CAROL_KEY, UPSTREAM_KEY, Env


async def test_success_envelope_field_by_field(env: Env) -> None:
    client = await env.start()
    body = {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "你好,请介绍一下自己"}],
        "temperature": 0.3,
        "max_tokens": 77,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "unknown_vendor_field": {"nested": [1, 2.5, None]},
    }
    status, doc, headers = await client.call(body)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert list(doc) == ["success", "message", "data"]
    assert doc["success"] is True
    assert doc["message"] == "请求成功"
    data = doc["data"]
    assert list(data) == ["response", "usage", "daily_limits"]
    assert data["response"]["id"] == "chatcmpl-fake"
    assert data["response"]["choices"][0]["message"] == {"role": "assistant", "content": "pong"}
    assert data["response"]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
    }
    assert data["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert data["daily_limits"] == {
        "requests": {"used": 1, "limit": 20, "remaining": 19},
        "tokens": {"used": 15, "limit": 100000, "remaining": 99985},
    }
    status, doc, _ = await client.call(body)
    assert doc["data"]["daily_limits"]["requests"] == {"used": 2, "limit": 20, "remaining": 18}
    assert doc["data"]["daily_limits"]["tokens"]["used"] == 30


async def test_request_is_forwarded_unchanged_with_the_upstream_key(env: Env) -> None:
    client = await env.start()
    raw = (
        b'{"model": "qwen-max", "messages": [{"role": "user", "content": "hi"}],'
        b' "temperature": 0.25, "stop": ["\\n"], "seed": 42}'
    )
    status, _, _ = await client.call(raw=raw)
    assert status == 200
    headers, body = env.upstream.requests[-1]
    assert body == raw  # byte for byte: every parameter passes through
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ALICE_KEY not in json.dumps(headers)
    assert "X-Api-Key" not in headers


async def test_key_stored_as_sha256_authenticates(env: Env) -> None:
    client = await env.start()
    status, doc, _ = await client.call(key=CAROL_KEY)
    assert status == 200
    # carol has no limits of her own: the built-in defaults apply
    assert doc["data"]["daily_limits"]["requests"]["limit"] == 1000
    assert doc["data"]["daily_limits"]["tokens"]["limit"] == 100000
    assert hashlib.sha256(CAROL_KEY.encode()).hexdigest() in env.users_file.read_text()


async def test_status_envelope_and_counters(env: Env) -> None:
    client = await env.start()
    for _ in range(3):
        assert (await client.call())[0] == 200
    resp = await client.http.fetch(client.base + "/api/status.php")
    doc = json.loads(resp.body)
    assert doc == {
        "success": True,
        "message": "OK",
        "data": {
            "status": "running",
            "api_key_configured": True,
            "queue_enabled": True,
            "stats": {
                "total_users": 3,
                "queue_length": 0,
                "processing": 0,
                "today_requests": 3,
                "today_tokens": 45,
            },
        },
    }


async def test_status_without_upstream_key_and_without_queue(env: Env) -> None:
    client = await env.start(upstream_api_key="", queue_size=0)
    data = await client.status()
    assert data["api_key_configured"] is False
    assert data["queue_enabled"] is False


async def test_aliases_without_php(env: Env) -> None:
    client = await env.start()
    assert (await client.call(path="/api/call"))[0] == 200
    resp = await client.http.fetch(client.base + "/api/status")
    assert json.loads(resp.body)["data"]["stats"]["today_requests"] == 1


async def test_missing_upstream_usage_is_estimated_and_charged(env: Env) -> None:
    env.upstream.usage = None
    client = await env.start()
    status, doc, _ = await client.call(
        {"model": "m", "messages": [{"role": "user", "content": "abcdefgh 你好"}]}
    )
    assert status == 200
    usage = doc["data"]["usage"]
    assert usage["estimated"] is True
    # "abcdefgh " is 9 ASCII characters (3 tokens) + 2 others; "pong" is 1 token
    assert usage == {
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "total_tokens": 6,
        "estimated": True,
    }
    assert doc["data"]["daily_limits"]["tokens"]["used"] == 6
    journal = (env.data_dir / f"{env.gateways[0].clock.today()}.jsonl").read_text()
    settles = [json.loads(line) for line in journal.split("\n") if '"k":"s"' in line]
    assert settles[-1]["e"] == 1 and settles[-1]["n"] == 6
