"""The journal store: restarts keep counters, bad files fail closed, dead processes free slots."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from conftest import ALICE_KEY, CAROL_KEY, VALID, Env


async def test_restart_keeps_counters_and_limits(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 5}})
    client = await env.start()
    for _ in range(3):
        assert (await client.call(VALID))[0] == 200
    await env.stop()
    client = await env.start()
    stats = (await client.status())["stats"]
    assert (stats["today_requests"], stats["today_tokens"]) == (3, 45)
    codes = [(await client.call(VALID))[0] for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_snapshot_is_written_and_used(env: Env) -> None:
    client = await env.start()
    for _ in range(2):
        assert (await client.call(VALID))[0] == 200
    day = env.gateways[0].clock.today()
    await env.stop()
    snap = json.loads((env.data_dir / f"{day}.json").read_text())
    assert snap["day"] == day
    assert snap["users"] == {"alice": {"requests": 2, "tokens": 30}}
    assert snap["journal_offset"] == (env.data_dir / f"{day}.jsonl").stat().st_size
    assert snap["open"] == {}


async def test_corrupt_snapshot_is_rebuilt_from_the_journal(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    client = await env.start()
    for _ in range(4):
        assert (await client.call(VALID))[0] == 200
    day = env.gateways[0].clock.today()
    await env.stop()
    for garbage in (b"", b'{"day": "2026', b"\x00\x01 garbage"):
        (env.data_dir / f"{day}.json").write_bytes(garbage)
        with caplog.at_level(logging.WARNING, logger="gateway"):
            client = await env.start()
        assert (await client.status())["stats"]["today_requests"] == 4
        assert any("rebuilding from" in r.message for r in caplog.records)
        await env.stop()


async def test_unreadable_record_fails_closed_for_its_user_only(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    day = env.gateways[0].clock.today()
    await env.stop()
    journal = env.data_dir / f"{day}.jsonl"
    with journal.open("ab") as f:
        f.write(b'\n{"u":"alice","k":"s","id":"x-1","n":\x00\xff broken}\n')
    with caplog.at_level(logging.ERROR, logger="gateway"):
        client = await env.start()
    status, doc, _ = await client.call(VALID)
    assert status == 500
    assert doc["message"] == "系统配置错误"
    assert "unreadable" in doc["data"]["error"]
    assert any("'alice'" in r.message and "cannot be trusted" in r.message for r in caplog.records)
    # carol is unaffected
    assert (await client.call(VALID, key=CAROL_KEY))[0] == 200


async def test_unattributable_garbage_fails_closed_for_everyone(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    day = env.gateways[0].clock.today()
    await env.stop()
    with (env.data_dir / f"{day}.jsonl").open("ab") as f:
        f.write(b"\n\x00\x00\x00\x00garbage\n")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        client = await env.start()
    for key in (ALICE_KEY, CAROL_KEY):
        assert (await client.call(VALID, key=key))[0] == 500
    assert any("refusing all calls" in r.message for r in caplog.records)
    # never a silent reset: the status still reports what could be read
    assert (await client.status())["stats"]["today_requests"] == 1


async def test_slots_of_a_dead_process_are_freed(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    client = await env.start()
    gw = env.gateways[0]
    day = gw.clock.today()
    # A process that reserved two slots and died (no owner lock is held for it).
    with (env.data_dir / f"{day}.jsonl").open("ab") as f:
        for n in (1, 2):
            rec = {"u": "alice", "k": "r", "id": f"dead-{n}", "o": "dead", "rl": 2, "tl": 9}
            f.write(b"\n" + json.dumps(rec).encode() + b"\n")
    status, doc, _ = await client.call(VALID)
    assert status == 429
    assert doc["data"]["daily_request_count"] == 2  # both slots taken, none charged
    await gw.store.maintain(day)
    codes = [(await client.call(VALID))[0] for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_slots_of_a_live_process_are_kept(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await env.start()
    other = await env.start()
    env.upstream.delay = 0.5
    day = env.gateways[0].clock.today()
    pending = asyncio.ensure_future(other.call(VALID))
    await asyncio.sleep(0.2)  # the other gateway holds alice's only slot
    await env.gateways[0].store.maintain(day)  # it is alive: the slot stays
    assert (await client.call(VALID))[0] == 429
    assert (await pending)[0] == 200
