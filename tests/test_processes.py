"""Real `python gateway.py` processes: shared data dir, kill -9 under load, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from conftest import (
    ALICE_KEY,
    ALL_SECRETS,
    KEY_ENV,
    Env,
    data_text,
    post,
    proc_args,
    status,
)


@pytest.mark.slow
async def test_two_processes_on_one_data_dir_share_one_limit(
    penv: Env, procs, tmp_path: Path
) -> None:
    penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 20}})
    penv.upstream.delay = 0.05
    a = procs(proc_args(penv), tmp_path / "a.log", KEY_ENV)
    b = procs(proc_args(penv), tmp_path / "b.log", KEY_ENV)
    await asyncio.gather(a.ready(), b.ready())
    http = penv.http
    for _round in range(3):
        results = await asyncio.gather(*(post(http, (a if i % 2 else b).base) for i in range(120)))
        codes = [c for c, _ in results]
        assert codes.count(200) == 20, codes
        assert codes.count(429) == 100
        penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 40 + 20 * _round}})
        await asyncio.sleep(0.6)  # both processes reload the raised limit
    assert (await status(http, a.base))["today_requests"] == 60
    assert (await status(http, b.base))["today_requests"] == 60
    assert len(penv.upstream.requests) == 60


@pytest.mark.slow
async def test_sigterm_finishes_queued_and_in_flight_calls(
    penv: Env, procs, tmp_path: Path
) -> None:
    penv.upstream.delay = 0.3
    p = procs(proc_args(penv, "--concurrency=2", "--queue-size=20"), tmp_path / "term.log", KEY_ENV)
    await p.ready()
    tasks = [asyncio.ensure_future(post(penv.http, p.base)) for _ in range(8)]
    await asyncio.sleep(0.15)
    p.kill(signal.SIGTERM)
    results = await asyncio.gather(*tasks)
    assert [c for c, _ in results] == [200] * 8
    assert await p.wait() == 0
    log = (tmp_path / "term.log").read_text()
    assert "stopping: finishing queued and in-flight calls" in log
    assert "stopped" in log
    day = next(penv.data_dir.glob("*.json"))
    assert json.loads(day.read_text())["users"]["alice"]["requests"] == 8
    # no key in the log or the data dir, even with the upstream key set by penv var
    for secret in ALL_SECRETS:
        assert secret not in log
        assert secret not in data_text(penv.data_dir)
