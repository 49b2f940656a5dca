"""'Today' is the calendar day in the configured zone; a call settles on its admission day."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import ALICE_KEY, VALID, Env

import gateway

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(text: str, tz: ZoneInfo = SHANGHAI) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


async def test_counters_start_at_zero_at_local_midnight(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    env.clock.t = at("2026-11-26T23:59:00")
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    status, _, headers = await client.call(VALID)
    assert status == 429
    assert headers["Retry-After"] == "60"
    # 16:00 UTC is midnight in Shanghai: a new day there, still the same day in UTC.
    env.clock.t = at("2026-11-27T00:00:00")
    status, doc, _ = await client.call(VALID)
    assert status == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    assert (env.data_dir / "2026-11-26.jsonl").exists()
    assert (env.data_dir / "2026-11-27.jsonl").exists()


async def test_call_admitted_before_midnight_settles_on_that_day(env: Env) -> None:
    env.clock.t = at("2026-11-26T23:59:59.9")
    env.upstream.delay = 0.5
    client = await env.start()
    pending = asyncio.ensure_future(client.call(VALID))
    await asyncio.sleep(0.2)
    env.clock.t = at("2026-11-27T00:00:00.1")  # midnight passes while the call is in flight
    status, doc, _ = await pending
    assert status == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    old = (env.data_dir / "2026-11-26.jsonl").read_text()
    assert '"k":"s"' in old
    new = env.data_dir / "2026-11-27.jsonl"
    assert not new.exists() or '"k":"s"' not in new.read_text()
    assert (await client.status())["stats"]["today_requests"] == 0
    await env.stop()
    snap = json.loads((env.data_dir / "2026-11-26.json").read_text())
    assert snap["users"]["alice"] == {"requests": 1, "tokens": 15}


async def test_clock_jumping_back_does_not_reset_twice(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    env.clock.t = at("2026-11-27T00:30:00")
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    env.clock.t = at("2026-11-26T23:30:00")  # the wall clock is set back an hour
    assert (await client.call(VALID))[0] == 200  # yesterday's count, which had room
    env.clock.t = at("2026-11-27T00:31:00")
    assert (await client.call(VALID))[0] == 429  # today's count was not reset


async def test_clock_jumping_forward_two_days_starts_a_fresh_day(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    env.clock.t = at("2026-11-26T12:00:00")
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    assert (await client.call(VALID))[0] == 429
    env.clock.t = at("2026-11-28T12:00:00")
    status, doc, _ = await client.call(VALID)
    assert status == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    assert sorted(p.name for p in env.data_dir.glob("*.jsonl")) == [
        "2026-11-26.jsonl",
        "2026-11-28.jsonl",
    ]


@pytest.mark.parametrize(
    ("day", "hours"),
    [("2025-03-09", 23), ("2025-11-02", 25), ("2026-03-08", 23), ("2026-11-01", 25)],
)
def test_dst_days_in_new_york(day: str, hours: int) -> None:
    ny = ZoneInfo("America/New_York")
    clock = gateway.DayClock(ny, lambda: at(f"{day}T00:00:00", ny))
    assert clock.today() == day
    assert clock.seconds_to_midnight() == hours * 3600
    # a request admitted a tenth of a second before midnight belongs to that day
    clock = gateway.DayClock(ny, lambda: at(f"{day}T00:00:00", ny) + hours * 3600 - 0.1)
    assert clock.today() == day
    assert clock.seconds_to_midnight() == 1


def test_day_clock_across_dst_transitions() -> None:
    ny = ZoneInfo("America/New_York")
    clock = gateway.DayClock(ny, lambda: at("2026-03-08T00:00:00", ny))
    assert clock.today() == "2026-03-08"
    assert clock.seconds_to_midnight() == 23 * 3600  # spring forward: a 23-hour day
    clock = gateway.DayClock(ny, lambda: at("2026-11-01T00:00:00", ny))
    assert clock.seconds_to_midnight() == 25 * 3600  # fall back: a 25-hour day
    clock = gateway.DayClock(ny, lambda: at("2026-11-01T23:59:59", ny))
    assert clock.today() == "2026-11-01"
    assert clock.seconds_to_midnight() == 1
