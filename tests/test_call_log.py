"""The call log (data/calls/DAY.jsonl): one line per finished call; totals equal the counters."""

from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import tornado.httpclient
from conftest import ALICE_KEY, ALL_SECRETS, BOB_KEY, CAROL_KEY, Client, Env

import gateway

SECRET_PROMPT = "PROMPT-CANARY-7f3a do not log this"


def call_lines(e: Env) -> list[dict[str, Any]]:
    day = e.gateways[0].clock.today() if e.gateways else None
    path = e.data_dir / "calls" / f"{day}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def body(model: str = "gpt-4o-mini", stream: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    if stream:
        doc["stream"] = True
    return doc


async def v1(client: Client, key: str | None, doc: dict[str, Any]) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await client.http.fetch(
        client.base + "/v1/chat/completions",
        method="POST",
        body=json.dumps(doc),
        headers=headers,
        raise_error=False,
        request_timeout=30,
    )
    return resp.code


async def test_mixed_calls_at_once_log_one_line_each_and_match_the_counters(env: Env) -> None:
    env.write_users(
        {
            "alice": {"api_key": ALICE_KEY, "daily_request_limit": 20},
            "bob": {"api_key": BOB_KEY, "enabled": False},
            "carol": {"api_key": CAROL_KEY, "daily_token_limit": 1_000_000},
        }
    )
    env.upstream.delay = 0.02
    client = await env.start(concurrency=4)
    calls = (
        [client.call(body(), key=ALICE_KEY) for _ in range(60)]  # 20 charged, 40 refused
        + [v1(client, CAROL_KEY, body("m-stream", stream=True)) for _ in range(15)]
        + [v1(client, CAROL_KEY, body("m-json")) for _ in range(15)]
        + [client.call(body(), key=BOB_KEY) for _ in range(5)]  # disabled
        + [client.call(body(), key=None) for _ in range(5)]  # no key
        + [client.call(raw=b"{not json", key=ALICE_KEY) for _ in range(5)]
    )
    results = await asyncio.gather(*calls)
    codes = [r[0] if isinstance(r, tuple) else r for r in results]
    assert sorted(codes) == sorted([200] * 50 + [429] * 40 + [401] * 10 + [400] * 5)

    lines = call_lines(env)
    # Requests that never authenticated (no key, a disabled key) leave no line on disk.
    assert len(lines) == len(calls) - 10
    assert sorted(x["status"] for x in lines) == sorted(c for c in codes if c != 401)
    charged = [x for x in lines if x["status"] == 200]
    requests, tokens = await env.gateways[0].store.totals(env.gateways[0].clock.today())
    logged = (len(charged), sum(x["total_tokens"] for x in charged))
    assert logged == (requests, tokens) == (50, 750)
    by_user = {
        u: (len(rows), sum(x["total_tokens"] for x in rows))
        for u in ("alice", "carol")
        for rows in [[x for x in charged if x["user"] == u]]
    }
    assert by_user == await env.gateways[0].store.usage(env.gateways[0].clock.today())
    assert {x["model"] for x in charged if x["user"] == "carol"} == {"m-stream", "m-json"}
    assert all(x["stream"] == (x["model"] == "m-stream") for x in charged)

    reasons = sorted({x["error"].split(":")[0] for x in lines if x["status"] != 200})
    assert reasons == ["daily_request_limit_exceeded", "invalid_request"]
    assert all(x["user"] for x in lines)
    assert {x["id"] for x in lines if x["status"] == 429} == {None}  # never admitted

    one = next(x for x in charged if x["model"] == "m-json")
    assert one["endpoint"] == "/v1/chat/completions"
    assert one["upstream_request_id"] == "chatcmpl-fake"
    assert (one["prompt_tokens"], one["completion_tokens"], one["total_tokens"]) == (10, 5, 15)
    assert one["estimated"] is False and one["partial"] is False
    assert one["upstream_ms"] >= 20 and one["queue_ms"] >= 0 and one["latency_ms"] >= 20
    assert one["time"].endswith("+08:00")  # in the gateway's --timezone
    assert one["id"].count("-") == 1  # the reservation id in the journal

    text = (env.data_dir / "calls").joinpath(f"{env.gateways[0].clock.today()}.jsonl").read_text()
    assert SECRET_PROMPT not in text and "pong" not in text  # no content either way
    for secret in ALL_SECRETS:
        assert secret not in text


async def test_upstream_failures_and_clients_that_leave(env: Env) -> None:
    client = await env.start(concurrency=1)
    env.upstream.status = 500
    assert (await client.call(body()))[0] == 502
    env.upstream.status = 200
    # The worker is busy for 1 s; the second client gives up while its call waits.
    env.upstream.delay = 1.0
    first = asyncio.ensure_future(client.call(body()))
    await asyncio.sleep(0.2)
    try:
        await client.http.fetch(
            client.base + "/api/call.php",
            method="POST",
            body=json.dumps(body()),
            headers={"X-API-Key": ALICE_KEY},
            request_timeout=0.3,
        )
    except tornado.httpclient.HTTPClientError as e:
        assert e.code == 599
    assert (await first)[0] == 200
    for _ in range(100):
        if len(call_lines(env)) == 3:
            break
        await asyncio.sleep(0.02)
    failed, ok, left = call_lines(env)
    assert (failed["status"], failed["error"].split(":")[0]) == (502, "upstream_error")
    assert "upstream says no (500)" in failed["error"] and failed["total_tokens"] == 0
    assert ok["status"] == 200
    assert left["status"] == 499 and left["error"].startswith("client_closed_request")
    assert left["total_tokens"] == 0 and left["upstream_ms"] is None
    assert await env.gateways[0].store.totals(env.gateways[0].clock.today()) == (1, 15)
    failures = env.gateways[0].service.calls.recent_failures()
    assert [f["status"] for f in failures] == [499, 502]  # newest first


async def test_retention_deletes_old_days_only(env: Env) -> None:
    env.data_dir.mkdir()
    (env.data_dir / "calls").mkdir()
    today = date.fromisoformat(gateway.DayClock(None, env.clock).today())
    days = [(today - timedelta(days=n)).isoformat() for n in (0, 1, 2, 3, 4, 30)]
    for day in days:
        for path in (
            env.data_dir / f"{day}.jsonl",
            env.data_dir / f"{day}.json",
            env.data_dir / "calls" / f"{day}.jsonl",
        ):
            path.write_text("")
    (env.data_dir / "notes.json").write_text("{}")  # not ours: left alone
    await env.start(retention_days=3, timezone="")
    left = sorted(p.name for p in env.data_dir.iterdir() if p.is_file())
    kept = [f"{d}.{x}" for d in days[:4] for x in ("json", "jsonl")]
    assert left == sorted([*kept, "notes.json"])
    calls = sorted(p.name for p in (env.data_dir / "calls").iterdir())
    assert calls == sorted(f"{d}.jsonl" for d in days[:4])


async def test_usage_report_reads_the_same_counters(env: Env, tmp_path: Path) -> None:
    client = await env.start()
    for _ in range(4):
        assert (await client.call(body()))[0] == 200
    await env.stop()
    admin = gateway.Admin(str(env.users_file), str(env.data_dir), "Asia/Shanghai")
    rows = await admin.usage_rows(admin.days(None, 7), None)
    logged = [x for x in call_lines_for(env) if x["status"] == 200]
    assert rows == [
        {
            "date": admin.clock.today(),
            "user": "alice",
            "requests": len(logged),
            "tokens": sum(x["total_tokens"] for x in logged),
        }
    ]
    assert rows[0]["requests"] == 4


def call_lines_for(e: Env) -> list[dict[str, Any]]:
    (path,) = (e.data_dir / "calls").glob("*.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_an_unwritable_call_log_does_not_fail_calls(env: Env, caplog) -> None:
    env.data_dir.mkdir()
    (env.data_dir / "calls").write_text("a file where the folder should be")
    client = await env.start()
    for _ in range(3):
        assert (await client.call(body()))[0] == 200
    assert await env.gateways[0].store.totals(env.gateways[0].clock.today()) == (3, 45)
    errors = [r for r in caplog.records if "call log" in r.getMessage()]
    assert len(errors) == 1  # logged once, not once per call
    assert errors[0].levelname == "ERROR"
