"""Midnight under libfaketime: a real gateway process whose clock crosses midnight in Shanghai."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from conftest import ALICE_KEY, KEY_ENV, Env, post, proc_args


@pytest.mark.slow
async def test_midnight_rollover_in_a_real_process(penv: Env, procs, tmp_path: Path) -> None:
    faketime = shutil.which("faketime")
    if faketime is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs faketime (.ci/run); it is missing")
        pytest.skip("faketime is not installed (apt-get install faketime)")
    penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    # 15:59:57 UTC is 23:59:57 in Asia/Shanghai; the fake clock runs on from there.
    p = procs(
        proc_args(penv),
        tmp_path / "faketime.log",
        {**KEY_ENV, "TZ": "UTC", "FAKETIME": "@2026-11-26 15:59:57", "LD_PRELOAD": _libfaketime()},
    )
    await p.ready()
    assert (await post(penv.http, p.base))[0] == 200
    assert (await post(penv.http, p.base))[0] == 429  # the limit of 1 is used up for the 26th
    await asyncio.sleep(3.5)  # past midnight in Shanghai
    code, doc = await post(penv.http, p.base)
    assert code == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    assert (penv.data_dir / "2026-11-26.jsonl").exists()
    assert (penv.data_dir / "2026-11-27.jsonl").exists()


def _libfaketime() -> str:
    for candidate in Path("/usr/lib").glob("*/faketime/libfaketime.so.1"):
        return str(candidate)
    raise AssertionError("libfaketime.so.1 not found next to the faketime command")
