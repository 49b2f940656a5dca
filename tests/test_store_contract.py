"""The usage store contract: every backend (file:, redis://) keeps the same rules.

The journal (JournalStore) is the reference. Each contract test runs once per backend with
the same assertions; a rule-based test compares both to a small pure-Python model; then the
Redis store on its own: two "machines" on one Redis, a dead process's leases, Redis going
away under a real gateway and coming back, no secrets in Redis, the admin commands.

A session-scoped redis-server is started on a free port (skipped when it is missing, a
failure when CI is set).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import redis.asyncio
from conftest import ALICE_KEY, ALL_SECRETS, CAROL_KEY, ROOT, VALID, Env, free_port
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import gateway
from gateway import (
    ADMIT,
    RESERVE,
    STRICT,
    CallFacts,
    Counts,
    Policy,
    QuotaExceeded,
    Reservation,
    Usage,
    User,
)

TZ = ZoneInfo("Asia/Shanghai")
FACTS = CallFacts(model="m", latency_ms=1)
SEED = int(os.environ.get("STORE_CONTRACT_SEED", "0")) or random.randrange(1, 10**9)


def today() -> str:
    return gateway.DayClock(TZ).today()


def days_before(day: str, n: int) -> str:
    return (date.fromisoformat(day) - timedelta(days=n)).isoformat()


def mkuser(
    name: str,
    rl: int = 1000,
    tl: int = 10**9,
    token_policy: str = ADMIT,
    **policy: Any,
) -> User:
    return User(name, b"\0" * 32, rl, tl, policy=Policy(token_policy=token_policy, **policy))


def used(tokens: int) -> Usage:
    prompt = tokens // 3
    return Usage(prompt, tokens - prompt, tokens)


def rng_for(test: str) -> random.Random:
    """Seeded per test; STORE_CONTRACT_SEED=<n> replays a run (failures name the seed)."""
    return random.Random(f"{SEED}-{test}")


# ---------------------------------------------------------------------------------------------
# redis-server on a free port
# ---------------------------------------------------------------------------------------------


def _die_with_the_tests() -> None:
    """In the child: a test run that is killed or times out takes its redis-server along."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """A throwaway redis-server: no persistence, 127.0.0.1 only."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, prefix: str = "", password: str = "") -> str:
        auth = f":{password}@" if password else ""
        query = f"?prefix={prefix}" if prefix else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0{query}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxclients",
                "4000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_the_tests,
        )
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.proc.returncode})")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; CI must run the Redis store's tests")
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop it."""
    _need_redis_server()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def fresh_url(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    if backend == "file":
        return f"file:{tmp / ('data-' + uuid.uuid4().hex[:8])}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url(prefix=f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["file", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store per test: a new data dir, or a new prefix on the session's Redis."""
    return fresh_url(request.param, request, tmp_path)


def open_store(url: str, tmp: Path | None = None) -> gateway.UsageStore:
    return gateway.open_store(url, str(tmp or "/nonexistent"), gateway.DayClock(TZ))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[gateway.UsageStore]:
    s = open_store(store_url)
    await s.start()
    yield s
    await s.close()


async def reserve_all(
    store: gateway.UsageStore, user: User, day: str, n: int, want: int = 0
) -> tuple[list[Reservation], list[QuotaExceeded]]:
    results = await asyncio.gather(
        *(store.reserve(user, day, want) for _ in range(n)), return_exceptions=True
    )
    granted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    others = [r for r in results if not isinstance(r, Reservation | QuotaExceeded)]
    assert not others, others[:3]
    return granted, refused


async def totals_now(store: gateway.UsageStore, day: str) -> tuple[int, int]:
    """totals() past the Redis store's half-second cache of them: the contract tests compare
    figures right after each change (test_totals_include_a_charge_at_once holds the cache
    itself to the contract)."""
    cache = getattr(store, "_totals", None)
    if isinstance(cache, dict):
        cache.clear()
    return await store.totals(day)


def scan_keys(client: redis.Redis, match: str = "*") -> list[bytes]:
    return sorted(client.scan_iter(match=match, count=1000))


def dump_redis(client: redis.Redis) -> list[bytes]:
    """Every key and every value in the Redis, as bytes."""
    out: list[bytes] = []
    for key in scan_keys(client):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"list":
            out += list(client.lrange(key, 0, -1))
        else:
            out.append(client.dump(key) or b"")
    return out


# ---------------------------------------------------------------------------------------------
# The contract, on every backend
# ---------------------------------------------------------------------------------------------


async def test_exact_daily_limit_under_concurrency(store: gateway.UsageStore) -> None:
    rng = rng_for("exact")
    day = today()
    usage: dict[str, tuple[int, int]] = {}
    for n in range(20):
        limit = rng.randint(1, 199)
        user = mkuser(f"u{n}", rl=limit)
        granted, refused = await reserve_all(store, user, day, 200)
        assert len(granted) == limit, (SEED, n, limit)
        assert len(refused) == 200 - limit
        assert {e.reason for e in refused} <= {"requests"}
        assert len({r.id for r in granted}) == limit
        assert await store.counts(user.name, day) == Counts(0, 0, limit, 0)
        # Finish them: a random mix of charges and failures, concurrently.
        settled = [r for r in granted if rng.random() < 0.6]
        charges = [rng.randint(0, 500) for _ in settled]
        released = [r for r in granted if r not in settled]
        await asyncio.gather(
            *(store.settle(r, used(t), FACTS) for r, t in zip(settled, charges, strict=True)),
            *(store.release(r) for r in released),
        )
        assert await store.counts(user.name, day) == Counts(len(settled), sum(charges), 0, 0)
        if settled:
            usage[user.name] = (len(settled), sum(charges))
        # The freed slots are free: exactly the released ones can be taken again.
        again, _ = await reserve_all(store, user, day, len(released) + 5)
        assert len(again) == len(released)
        await asyncio.gather(*(store.release(r) for r in again))
    assert await store.usage(day) == usage
    assert await totals_now(store, day) == (
        sum(r for r, _ in usage.values()),
        sum(t for _, t in usage.values()),
    )
    every = await store.all_counts(day)
    assert {u: c for u, c in every.items() if c != Counts()} == {
        u: Counts(r, t, 0, 0) for u, (r, t) in usage.items()
    }


async def test_settle_after_release_release_twice(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", rl=3)
    a = await store.reserve(user, day)
    await store.release(a)
    assert await store.counts("alice", day) == Counts(0, 0, 0, 0)
    # The call was answered after all: it is charged even though its slot was freed.
    after = await store.settle(a, used(15), FACTS)
    assert after == Counts(1, 15, 0, 0)
    assert await store.counts("alice", day) == Counts(1, 15, 0, 0)
    b = await store.reserve(user, day)
    await store.release(b)
    await store.release(b)  # twice: harmless
    c = await store.reserve(user, day)
    assert await store.counts("alice", day) == Counts(1, 15, 1, 0)
    await store.release(c)
    await store.release(c)
    assert await store.counts("alice", day) == Counts(1, 15, 0, 0)
    # Two slots are left of three: a double release gave back nothing extra.
    granted, refused = await reserve_all(store, user, day, 5)
    assert (len(granted), len(refused)) == (2, 3)
    for r in granted:
        await store.release(r)
    assert (await store.counts("alice", day)).reserved == 0
    assert await store.usage(day) == {"alice": (1, 15)}
    assert await totals_now(store, day) == (1, 15)


async def test_release_after_settle_changes_nothing(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", rl=10, rpm=2)
    a = await store.reserve(user, day)
    await store.settle(a, used(15), FACTS)
    await store.reserve(user, day)
    await store.release(a)  # a stray release of a charged call (a settle that raised)
    assert await store.counts("alice", day) == Counts(1, 15, 1, 0)
    # Its place in the rolling minute is not given back: it was charged.
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(user, day)
    assert refused.value.reason == "rpm"


async def test_reset(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", rl=4, tl=10**6, token_policy=RESERVE)
    for _ in range(3):
        r = await store.reserve(user, day)
        await store.settle(r, used(15), FACTS)
    flying = await store.reserve(user, day, want=40)
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(user, day)
    assert e.value.reason == "requests"
    before = await store.reset("alice", day)
    assert before == Counts(3, 45, 1, 40)
    assert await store.counts("alice", day) == Counts(0, 0, 1, 40)
    assert await store.usage(day) == {"alice": (3, 45)}
    assert await totals_now(store, day) == (3, 45)
    # The limits start over (the call in flight still holds its slot).
    more = [await store.reserve(user, day) for _ in range(3)]
    with pytest.raises(QuotaExceeded):
        await store.reserve(user, day)
    # The call in flight at the reset is still charged.
    assert await store.settle(flying, used(30), FACTS) == Counts(1, 30, 3, 0)
    for r in more:
        await store.release(r)
    assert await store.counts("alice", day) == Counts(1, 30, 0, 0)
    assert await store.usage(day) == {"alice": (4, 75)}
    assert await totals_now(store, day) == (4, 75)
    # A reset of a user who never called: nothing before, nothing after.
    assert await store.reset("nobody", day) == Counts()
    assert await store.counts("nobody", day) == Counts()
    assert "nobody" not in await store.usage(day)
    # A second reset returns what came after the first.
    assert await store.reset("alice", day) == Counts(1, 30, 0, 0)
    assert await store.usage(day) == {"alice": (4, 75)}


async def test_max_concurrency(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", rl=100, max_concurrency=2)
    granted, refused = await reserve_all(store, user, day, 10)
    assert len(granted) == 2
    assert {e.reason for e in refused} == {"concurrency"}
    assert refused[0].counts.reserved == 2
    await store.release(granted[0])
    third = await store.reserve(user, day)
    with pytest.raises(QuotaExceeded, match="concurrency"):
        await store.reserve(user, day)
    await store.settle(third, used(5), FACTS)
    fourth = await store.reserve(user, day)
    assert await store.counts("alice", day) == Counts(1, 5, 2, 0)
    # The daily limit comes first when both are reached.
    tight = mkuser("alice", rl=3, max_concurrency=2)
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(tight, day)
    assert e.value.reason == "requests"
    await store.release(fourth)
    await store.release(granted[1])


async def test_rpm_and_a_released_call_gives_its_place_back(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", rl=100, rpm=3)
    granted, refused = await reserve_all(store, user, day, 6)
    assert len(granted) == 3
    assert {e.reason for e in refused} == {"rpm"}
    assert all(1 <= e.retry_after <= 60 for e in refused)
    # A failed call costs nothing, its place in the minute included.
    await store.release(granted[0])
    replacement = await store.reserve(user, day)
    with pytest.raises(QuotaExceeded, match="rpm"):
        await store.reserve(user, day)
    # A settled call keeps its place: the slot is free, the minute is not.
    await store.settle(granted[1], used(10), FACTS)
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(user, day)
    assert e.value.reason == "rpm"
    assert await store.counts("alice", day) == Counts(1, 10, 2, 0)
    # Another user has a minute of their own.
    await store.release(await store.reserve(mkuser("bob", rpm=1), day))
    for r in (granted[2], replacement):
        await store.release(r)


async def test_tpm(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", tpm=100)
    a = await store.reserve(user, day)
    await store.settle(a, used(60), FACTS)
    b = await store.reserve(user, day)  # 60 < 100
    await store.settle(b, used(50), FACTS)
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(user, day)  # 110 in the last minute
    assert e.value.reason == "tpm"
    assert 1 <= e.value.retry_after <= 60
    # With token_policy reserve, what calls in flight hold counts too.
    held = mkuser("bob", tpm=100, token_policy=RESERVE)
    c = await store.reserve(held, day, want=70)
    d = await store.reserve(held, day, want=30)  # 0 + 70 < 100
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(held, day, want=1)  # 0 + 100 held
    assert e.value.reason == "tpm"
    await store.release(d)
    e2 = await store.reserve(held, day, want=1)
    await store.settle(c, used(10), FACTS)
    await store.settle(e2, used(0), FACTS)
    assert await store.counts("bob", day) == Counts(2, 10, 0, 0)
    # A reset does not empty the rolling minute.
    await store.reset("alice", day)
    with pytest.raises(QuotaExceeded, match="tpm"):
        await store.reserve(user, day)


async def test_token_policy_reserve(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", tl=1000, token_policy=RESERVE)
    a = await store.reserve(user, day, want=300, prompt=100)
    assert a.grant == 300
    b = await store.reserve(user, day, want=800, prompt=10)
    assert b.grant == 800  # reserve holds what it asks, even past the limit
    assert await store.counts("alice", day) == Counts(0, 0, 2, 1100)
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(user, day, want=1)
    assert e.value.reason == "tokens"
    assert e.value.counts.held == 1100
    await store.release(b)
    c = await store.reserve(user, day, want=0)
    assert c.grant == 0
    assert await store.settle(a, used(250), FACTS) == Counts(1, 250, 1, 0)
    d = await store.reserve(user, day, want=750)
    assert d.grant == 750
    with pytest.raises(QuotaExceeded, match="tokens"):
        await store.reserve(user, day, want=5)  # 250 + 750 held
    for r in (c, d):
        await store.release(r)
    assert await store.counts("alice", day) == Counts(1, 250, 0, 0)


async def test_token_policy_strict(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", tl=1000, token_policy=STRICT)
    a = await store.reserve(user, day, want=300, prompt=100)
    assert a.grant == 300
    b = await store.reserve(user, day, want=0, prompt=0)
    assert b.grant == 700  # no max_tokens: all that is left
    assert await store.counts("alice", day) == Counts(0, 0, 2, 1000)
    with pytest.raises(QuotaExceeded, match="tokens"):
        await store.reserve(user, day, want=1)
    await store.release(b)
    c = await store.reserve(user, day, want=900, prompt=50)
    assert c.grant == 700  # lowered to what is left
    await store.release(c)
    # A prompt that alone does not fit in what is left is refused.
    with pytest.raises(QuotaExceeded) as e:
        await store.reserve(user, day, want=900, prompt=701)
    assert e.value.reason == "tokens"
    assert await store.settle(a, used(250), FACTS) == Counts(1, 250, 0, 0)
    e2 = await store.reserve(user, day, want=2000, prompt=10)
    assert e2.grant == 750
    await store.release(e2)
    assert await store.counts("alice", day) == Counts(1, 250, 0, 0)


async def test_token_policy_strict_prompt_at_the_edge(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", tl=1000, token_policy=STRICT)
    a = await store.reserve(user, day, want=300, prompt=100)
    await store.settle(a, used(300), FACTS)
    # 700 left: a prompt estimate that fills it leaves no room to answer.
    for prompt in (701, 700):
        with pytest.raises(QuotaExceeded) as e:
            await store.reserve(user, day, want=900, prompt=prompt)
        assert e.value.reason == "tokens"
    d = await store.reserve(user, day, want=900, prompt=699)
    assert d.grant == 700
    await store.release(d)
    assert await store.counts("alice", day) == Counts(1, 300, 0, 0)


async def test_totals_include_a_charge_at_once(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice")
    assert await store.totals(day) == (0, 0)
    r = await store.reserve(user, day)
    await store.settle(r, used(15), FACTS)
    assert await store.totals(day) == (1, 15)
    r = await store.reserve(user, day)
    await store.settle(r, used(5), FACTS)
    assert await store.totals(day) == (2, 20)
    await store.reset("alice", day)
    assert await store.totals(day) == (2, 20)  # a reset keeps the day's totals


async def test_token_policy_admit_ignores_holds(store: gateway.UsageStore) -> None:
    day = today()
    holder = mkuser("alice", tl=1000, token_policy=RESERVE)
    a = await store.reserve(holder, day, want=1000)
    assert a.grant == 1000
    with pytest.raises(QuotaExceeded, match="tokens"):
        await store.reserve(holder, day, want=1)
    # The same user under token_policy admit: tokens used (0) < limit, holds are not counted.
    admit = mkuser("alice", tl=1000, token_policy=ADMIT)
    b = await store.reserve(admit, day, want=500)
    assert b.grant == 0
    assert await store.counts("alice", day) == Counts(0, 0, 2, 1000)
    await store.settle(b, used(999), FACTS)
    c = await store.reserve(admit, day)  # 999 < 1000
    await store.settle(c, used(1), FACTS)
    with pytest.raises(QuotaExceeded, match="tokens"):
        await store.reserve(admit, day)  # 1000: the limit
    await store.release(a)
    assert await store.counts("alice", day) == Counts(2, 1000, 0, 0)


async def test_days_are_separate_and_prune_removes_old_days_only(
    store: gateway.UsageStore, store_url: str, request: pytest.FixtureRequest
) -> None:
    now = today()
    days = {n: days_before(now, n) for n in (0, 1, 3, 4, 5)}
    user = mkuser("alice", rl=2)
    for n, day in days.items():
        for _ in range(n % 2 + 1):
            r = await store.reserve(user, day)
            await store.settle(r, used(10 + n), FACTS)
    # Each day has its own limit: 2 on every day, whatever the others used.
    for n, day in days.items():
        assert await store.counts("alice", day) == Counts(n % 2 + 1, (n % 2 + 1) * (10 + n), 0, 0)
        assert await store.usage(day) == {"alice": (n % 2 + 1, (n % 2 + 1) * (10 + n))}
        assert await totals_now(store, day) == (n % 2 + 1, (n % 2 + 1) * (10 + n))
    extra = await store.reserve(user, days[0])
    with pytest.raises(QuotaExceeded):
        await store.reserve(user, days[0])
    await store.release(await store.reserve(user, days[4]))  # day 0 is full, day 4 is not
    await store.release(extra)
    removed = await store.prune(3, now)
    gone = {m for entry in removed for m in re.findall(r"\d{4}-\d{2}-\d{2}", entry)}
    assert gone == {days[4], days[5]}, removed
    for n in (4, 5):
        assert await store.usage(days[n]) == {}
        assert await store.all_counts(days[n]) == {}
    for n in (0, 1, 3):
        assert await store.usage(days[n]) == {"alice": (n % 2 + 1, (n % 2 + 1) * (10 + n))}
    assert await store.prune(3, now) == []
    # Nothing of the pruned days is left behind.
    if store_url.startswith("redis"):
        prefix = re.search(r"prefix=(\w+)", store_url).group(1)  # type: ignore[union-attr]
        client = request.getfixturevalue("redis_server").client()
        keys = scan_keys(client, f"*{prefix}*")
        client.close()
        assert keys
        assert not [k for k in keys if days[4].encode() in k or days[5].encode() in k], keys
    else:
        root = Path(store_url[5:])
        left = sorted(p.name for p in root.iterdir())
        assert not [n for n in left if n.startswith((days[4], days[5]))], left
        assert any(n.startswith(days[3]) for n in left)


# Midnight, through a gateway on each backend: the day comes from the gateway's clock (the
# configured zone), the rolling minute from the store.
SHANGHAI = ZoneInfo("Asia/Shanghai")


def shanghai(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).timestamp()


async def test_counters_start_at_zero_at_local_midnight(senv: Env, store_url: str) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    senv.clock.t = shanghai("2026-11-26T23:59:00")
    client = await senv.start(store=store_url)
    assert (await client.call(VALID))[0] == 200
    status, doc, _ = await client.call(VALID)
    assert status == 429, doc
    senv.clock.t = shanghai("2026-11-27T00:00:00")  # 16:00 UTC: midnight in Shanghai
    status, doc, _ = await client.call(VALID)
    assert status == 200, doc
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    store = senv.gateways[0].service.store
    assert (await store.counts("alice", "2026-11-26")).requests == 1
    assert (await store.counts("alice", "2026-11-27")).requests == 1
    assert (await client.status())["stats"]["today_requests"] == 1


async def test_a_call_admitted_before_midnight_settles_on_that_day(
    senv: Env, store_url: str
) -> None:
    senv.clock.t = shanghai("2026-11-26T23:59:59.9")
    senv.upstream.delay = 0.5
    client = await senv.start(store=store_url)
    pending = asyncio.ensure_future(client.call(VALID))
    await asyncio.sleep(0.2)
    senv.clock.t = shanghai("2026-11-27T00:00:00.1")  # midnight passes while it is in flight
    status, doc, _ = await pending
    assert status == 200, doc
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1
    store = senv.gateways[0].service.store
    assert await store.counts("alice", "2026-11-26") == Counts(1, 15, 0, 0)
    assert await store.counts("alice", "2026-11-27") == Counts()
    assert (await client.status())["stats"]["today_requests"] == 0
    assert await store.usage("2026-11-26") == {"alice": (1, 15)}


async def test_a_huge_hold_still_counts_as_a_call_in_flight(store: gateway.UsageStore) -> None:
    """A client may ask for max_tokens of any size: the hold it makes is a number like any
    other (Lua writes 1e15 with an exponent; that lease must not look like a dead one's)."""
    day = today()
    user = mkuser("huge", tl=10**18, token_policy=RESERVE, max_concurrency=1)
    first = await store.reserve(user, day, want=10**15)
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(user, day, want=10**15)
    assert refused.value.reason == "concurrency"
    await store.settle(first, used(5), FACTS)
    await store.settle(await store.reserve(user, day, want=10**15), used(5), FACTS)
    assert await store.counts("huge", day) == Counts(2, 10, 0, 0)


async def test_a_max_tokens_of_4000_digits_harms_no_one_else(senv: Env, store_url: str) -> None:
    """A hold is capped where it is computed: a client's absurd max_tokens can neither fail
    the calls that share its Redis pipeline nor slip past max_concurrency."""
    senv.write_users(
        {
            "alice": {"api_key": ALICE_KEY, "max_concurrency": 1, "token_policy": "reserve"},
            "carol": {"api_key": CAROL_KEY},
        }
    )
    senv.upstream.delay = 0.3
    client = await senv.start(store=store_url)
    huge = {**VALID, "max_tokens": int("9" * 4000)}
    results = await asyncio.gather(
        client.call(huge), client.call(huge), *(client.call(key=CAROL_KEY) for _ in range(20))
    )
    alice, carol = [r[0] for r in results[:2]], [r[0] for r in results[2:]]
    assert sorted(alice) == [200, 429], results[:2]  # one in flight at a time, as configured
    assert carol == [200] * 20
    status = await client.status()
    assert status["status"] == "running"
    assert status["stats"]["today_requests"] == 21


async def test_peek(store: gateway.UsageStore) -> None:
    day = today()
    user = mkuser("alice", token_policy=RESERVE)
    assert store.peek("alice", day) is None
    r = await store.reserve(user, day, want=20)
    assert store.peek("alice", day) == Counts(0, 0, 1, 20)
    await store.settle(r, used(15), FACTS)
    assert store.peek("alice", day) == Counts(1, 15, 0, 0)
    assert store.peek("bob", day) is None
    assert store.peek("alice", days_before(day, 1)) is None
    # A refusal is seen too.
    with pytest.raises(QuotaExceeded):
        await store.reserve(mkuser("alice", rl=1), day)
    assert store.peek("alice", day) == Counts(1, 15, 0, 0)


# ---------------------------------------------------------------------------------------------
# The contract against a model: random sequences, three users, random limits and policies
# ---------------------------------------------------------------------------------------------

NAMES = ("ann", "ben", "cat")


@dataclass
class ModelUser:
    requests: int = 0
    tokens: int = 0
    open: dict[str, int] = field(default_factory=dict)  # reservation id -> hold
    used_requests: int = 0
    used_tokens: int = 0

    def counts(self) -> Counts:
        return Counts(self.requests, self.tokens, len(self.open), sum(self.open.values()))


def model_verdict(m: ModelUser, user: User, want: int, prompt: int) -> tuple[str, int]:
    """The journal's rules (no rpm/tpm): ("", grant) or (reason, 0)."""
    p = user.policy
    reserved, held = len(m.open), sum(m.open.values())
    held_now = held if p.token_policy != ADMIT else 0
    if m.requests + reserved >= user.daily_request_limit:
        return "requests", 0
    if m.tokens + held_now >= user.daily_token_limit:
        return "tokens", 0
    if p.max_concurrency and reserved >= p.max_concurrency:
        return "concurrency", 0
    if p.token_policy == RESERVE:
        return "", want
    if p.token_policy == STRICT:
        left = user.daily_token_limit - m.tokens - held
        if prompt >= left:  # the prompt alone fills what is left: no room to answer
            return "tokens", 0
        return "", min(want, left) if want else left
    return "", 0


user_limits = st.tuples(
    st.integers(1, 6),  # daily requests
    st.one_of(st.integers(1, 30), st.integers(200, 900)),  # daily tokens
    st.integers(0, 3),  # max_concurrency
    st.sampled_from([ADMIT, RESERVE, STRICT]),
)


class StoreMachine(RuleBasedStateMachine):
    """One example: three users on a day of its own on the test's store (pruned after it)."""

    store: gateway.UsageStore
    loop: asyncio.AbstractEventLoop
    examples: Iterator[int]

    def __init__(self) -> None:
        super().__init__()
        self.day = (date(2001, 1, 1) + timedelta(days=next(self.examples))).isoformat()
        self.names = {base: base for base in NAMES}
        self.users: dict[str, User] = {}
        self.model = {name: ModelUser() for name in self.names.values()}
        self.live: list[tuple[Reservation, bool]] = []  # granted reservations, settled?

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        after = (date.fromisoformat(self.day) + timedelta(days=1)).isoformat()
        self.run(self.store.prune(0, after))

    def set_user(self, base: str, limits: tuple[int, int, int, str]) -> None:
        rl, tl, mc, tp = limits
        name = self.names[base]
        self.users[name] = mkuser(name, rl, tl, tp, max_concurrency=mc)

    @initialize(limits=st.tuples(user_limits, user_limits, user_limits))
    def setup(self, limits: tuple[Any, Any, Any]) -> None:
        for base, lim in zip(NAMES, limits, strict=True):
            self.set_user(base, lim)

    @rule(base=st.sampled_from(NAMES), limits=user_limits)
    def change_limits(self, base: str, limits: tuple[int, int, int, str]) -> None:
        self.set_user(base, limits)  # users.yaml reloaded: the next reservation uses these

    @rule(base=st.sampled_from(NAMES), want=st.integers(0, 400), data=st.data())
    def reserve(self, base: str, want: int, data: st.DataObject) -> None:
        self.do_reserve(base, want, data.draw(st.integers(0, max(want, 1)), label="prompt"))

    @rule(base=st.sampled_from(NAMES), n=st.integers(1, 4), data=st.data())
    def reserve_several(self, base: str, n: int, data: st.DataObject) -> None:
        for _ in range(n):
            want = data.draw(st.integers(0, 400), label="want")
            self.do_reserve(base, want, data.draw(st.integers(0, want + 5), label="prompt"))

    @rule(base=st.sampled_from(NAMES), delta=st.integers(-1, 1), extra=st.integers(0, 50))
    def reserve_at_the_edge(self, base: str, delta: int, extra: int) -> None:
        # A prompt estimate just under, at or just over what is left of the day's tokens.
        m, user = self.model[self.names[base]], self.users[self.names[base]]
        left = user.daily_token_limit - m.tokens - sum(m.open.values())
        prompt = max(0, left + delta)
        self.do_reserve(base, prompt + extra, prompt)

    def do_reserve(self, base: str, want: int, prompt: int) -> None:
        name = self.names[base]
        m, user = self.model[name], self.users[name]
        reason, grant = model_verdict(m, user, want, prompt)
        try:
            res = self.run(self.store.reserve(user, self.day, want, prompt))
        except QuotaExceeded as e:
            assert (e.reason, e.counts) == (reason, m.counts())
            return
        assert reason == "", f"granted, the model refuses: {reason}"
        assert (res.user, res.day, res.grant) == (name, self.day, grant)
        m.open[res.id] = grant
        self.live.append((res, False))

    @precondition(lambda self: any(not done for _, done in self.live))
    @rule(data=st.data(), tokens=st.integers(0, 200))
    def settle(self, data: st.DataObject, tokens: int) -> None:
        choices = [i for i, (_, done) in enumerate(self.live) if not done]
        i = data.draw(st.sampled_from(choices), label="which")
        res = self.live[i][0]
        self.live[i] = (res, True)
        m = self.model[res.user]
        m.open.pop(res.id, None)
        m.requests += 1
        m.tokens += tokens
        m.used_requests += 1
        m.used_tokens += tokens
        after = self.run(self.store.settle(res, used(tokens), FACTS))
        assert after == m.counts()

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        # Any reservation, settled or released before: only an open one gives a slot back.
        res = data.draw(st.sampled_from([r for r, _ in self.live]), label="which")
        self.model[res.user].open.pop(res.id, None)
        self.run(self.store.release(res))

    @precondition(lambda self: any(m.counts() != Counts() for m in self.model.values()))
    @rule(base=st.sampled_from(NAMES))
    def reset(self, base: str) -> None:
        m = self.model[self.names[base]]
        before = self.run(self.store.reset(self.names[base], self.day))
        assert before == m.counts()
        m.requests = m.tokens = 0

    @rule()
    def same_all_counts(self) -> None:
        every = self.run(self.store.all_counts(self.day))
        assert {u: c for u, c in every.items() if c != Counts()} == {
            n: m.counts() for n, m in self.model.items() if m.counts() != Counts()
        }

    @invariant()
    def same_counts(self) -> None:
        for name, m in self.model.items():
            assert self.run(self.store.counts(name, self.day)) == m.counts(), name
        usage = {n: (m.used_requests, m.used_tokens) for n, m in self.model.items()}
        assert self.run(self.store.usage(self.day)) == {n: u for n, u in usage.items() if u[0]}
        assert self.run(totals_now(self.store, self.day)) == (
            sum(r for r, _ in usage.values()),
            sum(t for _, t in usage.values()),
        )


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_store_matches_the_model(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failure is shrunk for 20 s at most (Hypothesis's own bound is 5 min, past the timeout).
    from hypothesis.internal.conjecture import engine  # noqa: PLC0415

    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", 20, raising=False)
    # Synchronous: the machine drives its own event loop, one store for every example.
    loop = asyncio.new_event_loop()
    store = open_store(fresh_url(backend, request, tmp_path))
    loop.run_until_complete(store.start())
    machine = type(
        "StoreMachine_" + backend,
        (StoreMachine,),
        {"store": store, "loop": loop, "examples": itertools.count()},
    )
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=40,
                stateful_step_count=60,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        loop.run_until_complete(store.close())
        loop.run_until_complete(asyncio.sleep(0))  # let a cancelled renew task finish
        loop.close()


# ---------------------------------------------------------------------------------------------
# Across processes and machines
# ---------------------------------------------------------------------------------------------


async def test_two_redis_machines_keep_the_limit_exact(redis_server: RedisServer) -> None:
    url = redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}")
    a, b = open_store(url), open_store(url)
    await a.start()
    await b.start()
    try:
        assert a.owner != b.owner  # type: ignore[attr-defined]
        rng = rng_for("machines")
        day = today()
        for n in range(10):
            limit = rng.randint(1, 199)
            user = mkuser(f"u{n}", rl=limit, token_policy=RESERVE)
            results = await asyncio.gather(
                *((a if i % 2 else b).reserve(user, day, want=3) for i in range(200)),
                return_exceptions=True,
            )
            granted = [r for r in results if isinstance(r, Reservation)]
            refused = [r for r in results if isinstance(r, QuotaExceeded)]
            assert len(granted) == limit, (SEED, n, limit)
            assert len(refused) == 200 - limit
            assert {e.reason for e in refused} <= {"requests"}
            for s in (a, b):
                assert await s.counts(user.name, day) == Counts(0, 0, limit, 3 * limit)
            # Each machine settles the other's reservations: the store is shared.
            await asyncio.gather(
                *(
                    (b if i % 2 else a).settle(r, used(i), FACTS)
                    for i, r in enumerate(granted)
                    if i % 3
                ),
                *((a if i % 2 else b).release(r) for i, r in enumerate(granted) if not i % 3),
            )
            charged = [i for i in range(limit) if i % 3]
            expected = Counts(len(charged), sum(charged), 0, 0)
            assert await a.counts(user.name, day) == expected
            assert await b.counts(user.name, day) == expected
    finally:
        await a.close()
        await b.close()


def _reserve_in_thread(
    url: str, user: User, day: str, n: int, *, start: threading.Barrier, out: list[Any]
) -> None:
    """One "process": its own JournalStore and event loop, in a thread of its own."""

    async def run() -> None:
        s = open_store(url)
        await s.start()
        start.wait()
        for _ in range(n):
            try:
                out.append(await s.reserve(user, day))
            except QuotaExceeded as e:
                out.append(e.reason)
        # Dies without releasing: drops its owner lock as the kernel would (no close()).
        s._owner_lock.release()  # type: ignore[attr-defined]
        for ledger in s._ledgers.values():  # type: ignore[attr-defined]
            ledger.close()

    asyncio.run(run())


async def test_two_journal_processes_keep_the_limit_exact(tmp_path: Path) -> None:
    url = f"file:{tmp_path / 'data'}"
    rng = rng_for("journals")
    day = today()
    survivor = open_store(url)
    await survivor.start()
    try:
        for n in range(10):
            limit = rng.randint(1, 199)
            user = mkuser(f"u{n}", rl=limit)
            barrier = threading.Barrier(2)
            outs: list[list[Any]] = [[], []]
            threads = [
                threading.Thread(
                    target=_reserve_in_thread,
                    args=(url, user, day, 100),
                    kwargs={"start": barrier, "out": outs[i]},
                )
                for i in range(2)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                await asyncio.sleep(0.01)
            results = outs[0] + outs[1]
            assert len(results) == 200
            granted = [r for r in results if isinstance(r, Reservation)]
            assert len(granted) == limit, (SEED, n, limit)
            assert set(results) - set(granted) <= {"requests"}
            assert await survivor.counts(user.name, day) == Counts(0, 0, limit, 0)
            # Both "processes" died holding their slots: housekeeping frees them.
            await survivor.maintain(day)
            assert await survivor.counts(user.name, day) == Counts(0, 0, 0, 0)
    finally:
        await survivor.close()


# ---------------------------------------------------------------------------------------------
# Leases: a dead process's reservations are freed, a live one's are kept
# ---------------------------------------------------------------------------------------------


async def test_redis_lease_of_a_dead_process_expires(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "REDIS_LEASE_MS", 1000)
    monkeypatch.setattr(gateway, "REDIS_RENEW_SECONDS", 0.2)
    url = redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}")
    dead, live, watcher = open_store(url), open_store(url), open_store(url)
    for s in (dead, live, watcher):
        await s.start()
    day = today()
    user = mkuser("alice", rl=10, token_policy=RESERVE)
    try:
        for _ in range(3):
            await dead.reserve(user, day, want=10)
        kept = [await live.reserve(mkuser("bob", token_policy=RESERVE), day, 7) for _ in range(2)]
        await asyncio.sleep(0.5)  # a renewal or two
        # The process dies: no more renewals, no release.
        dead._renewing.cancel()  # type: ignore[attr-defined]
        died = time.monotonic()
        await dead._redis.aclose()  # type: ignore[attr-defined]
        assert await watcher.counts("alice", day) == Counts(0, 0, 3, 30)
        while (await watcher.counts("alice", day)).reserved:
            assert time.monotonic() - died < 2.0, "a dead process's slots were kept"
            await asyncio.sleep(0.05)
        assert await watcher.counts("alice", day) == Counts(0, 0, 0, 0)
        # Its slots can be taken again: all 10.
        granted, _ = await reserve_all(watcher, user, day, 12)
        assert len(granted) == 10
        for r in granted:
            await watcher.release(r)
        # The live process renews its leases: still held after three lease times.
        while time.monotonic() - died < 3.3:
            assert await watcher.counts("bob", day) == Counts(0, 0, 2, 14)
            await asyncio.sleep(0.25)
        await live.settle(kept[0], used(5), FACTS)
        await live.release(kept[1])
        assert await watcher.counts("bob", day) == Counts(1, 5, 0, 0)
    finally:
        await live.close()
        await watcher.close()


async def test_journal_slots_of_a_dead_process_are_freed(tmp_path: Path) -> None:
    url = f"file:{tmp_path / 'data'}"
    dead, live, watcher = open_store(url), open_store(url), open_store(url)
    for s in (dead, live, watcher):
        await s.start()
    day = today()
    for _ in range(3):
        await dead.reserve(mkuser("alice", token_policy=RESERVE), day, want=10)
    kept = await live.reserve(mkuser("bob"), day)
    dead._owner_lock.release()  # type: ignore[attr-defined]  # killed: the kernel drops its lock
    assert await watcher.counts("alice", day) == Counts(0, 0, 3, 30)
    await watcher.maintain(day)
    assert await watcher.counts("alice", day) == Counts(0, 0, 0, 0)
    assert await watcher.counts("bob", day) == Counts(0, 0, 1, 0)
    await live.release(kept)
    for s in (live, watcher):
        await s.close()


# ---------------------------------------------------------------------------------------------
# Through a real gateway
# ---------------------------------------------------------------------------------------------


async def test_redis_down_fails_calls_at_once_and_service_resumes(
    senv: Env, own_redis: RedisServer
) -> None:
    client = await senv.start(store=own_redis.url(prefix="down"))
    assert (await client.call(VALID))[0] == 200
    relayed = len(senv.upstream.requests)
    own_redis.stop()
    for _ in range(2):
        started = time.monotonic()
        code, doc, headers = await client.call(VALID)
        took = time.monotonic() - started
        assert code == 500, doc
        assert "usage store" in doc["data"]["error"], doc
        assert headers.get("Retry-After") == "1"
        assert took < 1.0, f"the call waited {took:.2f} s for a Redis that is gone"
    assert len(senv.upstream.requests) == relayed  # nothing was relayed
    started = time.monotonic()
    status = await client.status()
    assert status["status"] == "store_unavailable"
    assert time.monotonic() - started < 1.0
    own_redis.start()  # the same port, an empty Redis
    code, doc, _ = await client.call(VALID)
    assert code == 200, doc
    assert len(senv.upstream.requests) == relayed + 1
    assert (await client.status())["status"] == "running"
    # (What that call charged is in test_charges_after_redis_lost_its_data_are_listed.)


# When Redis loses its data (a restart without persistence, a failover, FLUSHDB), a user's
# later charges are listed again at the next maintenance round, even if they call no more:
# usage(), totals(), all_counts(), /api/status.php and `gateway.py usage` include them.
async def test_charges_after_redis_lost_its_data_are_listed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    s = open_store(redis_server.url(prefix=prefix))
    await s.start()
    day = today()
    user = mkuser("alice", token_policy=ADMIT)
    try:
        await s.settle(await s.reserve(user, day), used(15), FACTS)
        assert await s.usage(day) == {"alice": (1, 15)}
        conn = redis_server.client()
        for key in scan_keys(conn, f"*{prefix}*"):  # Redis restarted empty
            conn.delete(key)
        conn.close()
        await s.settle(await s.reserve(user, day), used(5), FACTS)
        assert await s.counts("alice", day) == Counts(1, 5, 0, 0)
        await s.maintain(day)  # housekeeping runs; alice calls no more
        assert await s.usage(day) == {"alice": (1, 5)}
        assert await s.all_counts(day) == {"alice": Counts(1, 5, 0, 0)}
        assert await totals_now(s, day) == (1, 5)
    finally:
        await s.close()


async def test_a_flushed_script_cache_is_refilled_and_limits_stay_exact(
    redis_server: RedisServer,
) -> None:
    """Calls in flight share pipelines; when Redis has forgotten the scripts (a restart,
    SCRIPT FLUSH), every EVALSHA in the pipeline fails unrun, and all are sent again."""
    s = open_store(redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}"))
    await s.start()
    day = today()
    user = mkuser("flush", rl=37)
    try:
        for _ in range(2):
            conn = redis_server.client()
            conn.script_flush()
            conn.close()
            granted, refused = await reserve_all(s, user, day, 100)
            await asyncio.gather(*(s.settle(r, used(1), FACTS) for r in granted[:20]))
            await asyncio.gather(*(s.release(r) for r in granted[20:]))
        assert (await s.counts("flush", day)).requests == 37
        assert len(granted) == 37 - 20 and len(refused) == 100 - 17
    finally:
        await s.close()


async def test_a_hung_redis_fails_every_call_within_the_timeout(own_redis: RedisServer) -> None:
    """Redis stops answering (SIGSTOP: connections stay open) while calls keep coming: each
    call fails within about one timeout, however many queue up behind the pipeline that
    waits; when Redis answers again, so does the store."""
    s = open_store(own_redis.url(prefix="hung"))
    await s.start()
    day = today()
    users = [mkuser(f"h{n}") for n in range(50)]
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    waits: list[float] = []

    async def one(user: User) -> None:
        started = time.monotonic()
        with pytest.raises(gateway.StoreUnavailable):
            await s.reserve(user, day)
        waits.append(time.monotonic() - started)

    try:
        calls = []
        for tick in range(40):  # 1,000 calls a second for 4 s
            calls += [asyncio.ensure_future(one(u)) for u in users[: 25 + tick % 2]]
            await asyncio.sleep(0.04)
        await asyncio.wait_for(asyncio.gather(*calls), 30)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert len(waits) >= 1000
    assert max(waits) < gateway.REDIS_TIMEOUT + 1.0, sorted(waits)[-5:]
    r = await s.reserve(users[0], day)
    await s.settle(r, used(1), FACTS)
    assert await s.counts("h0", day) == Counts(1, 1, 0, 0)
    await s.close()


async def test_no_secret_reaches_redis(senv: Env, redis_server: RedisServer) -> None:
    prefix = f"canary{uuid.uuid4().hex[:8]}"
    client = await senv.start(store=redis_server.url(prefix=prefix))
    for key in (ALICE_KEY, CAROL_KEY, ALICE_KEY):
        assert (await client.call(VALID, key=key))[0] == 200
    assert (await client.call(VALID, key="sk-wrong-CANARY-00000000"))[0] == 401
    conn = redis_server.client()
    try:
        ours = scan_keys(conn, f"*{prefix}*")
        assert ours  # the gateway did write here
        everything = b"\n".join(dump_redis(conn))
    finally:
        conn.close()
    assert b"alice" in everything and b"carol" in everything
    for secret in (*ALL_SECRETS, "sk-wrong-CANARY-00000000"):
        assert secret.encode() not in everything, secret
    assert b"CANARY" not in everything


def test_open_store_refuses_unknown_schemes_and_hides_passwords(tmp_path: Path) -> None:
    clock = gateway.DayClock(TZ)
    with pytest.raises(gateway.ConfigError, match="mongodb"):
        gateway.open_store("mongodb://x", str(tmp_path), clock)
    with pytest.raises(gateway.ConfigError):
        gateway.open_store("redis-cluster://x", str(tmp_path), clock)
    assert isinstance(gateway.open_store("", str(tmp_path), clock), gateway.JournalStore)
    assert isinstance(gateway.open_store("file:", str(tmp_path), clock), gateway.JournalStore)
    for url in (
        "redis://:hunter2-CANARY@127.0.0.1:6390/0",
        "redis://admin:hunter2-CANARY@127.0.0.1:6390/0?prefix=x",
        "rediss://default:hunter2-CANARY@redis.example:6390/2",
        "redis://127.0.0.1:6390/0?password=hunter2-CANARY&prefix=y",
        "unix://:hunter2-CANARY@/run/redis.sock?db=0",
    ):
        s = gateway.open_store(url, str(tmp_path), clock)
        assert isinstance(s, gateway.RedisStore)
        assert "hunter2" not in s.name, (url, s.name)
        assert s.name


async def test_unreachable_redis_error_hides_the_password() -> None:
    url = f"redis://:hunter2-CANARY@127.0.0.1:{free_port()}/0"
    s = open_store(url)
    with pytest.raises(gateway.StoreUnavailable) as e:
        await s.start()
    assert "hunter2" not in str(e.value)
    assert "hunter2" not in s.problem  # type: ignore[attr-defined]
    await s.close()


def admin(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def usage_rows(out: str) -> list[dict[str, Any]]:
    """`usage --format=json`, the columns this file is about (others may be added)."""
    keep = ("date", "user", "requests", "tokens")
    return [{k: row[k] for k in keep} for row in json.loads(out)]


async def test_admin_commands_read_the_redis_store(
    senv: Env, redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url(prefix=f"admin{uuid.uuid4().hex[:8]}")
    client = await senv.start(store=url)
    for key in (ALICE_KEY, ALICE_KEY, ALICE_KEY, CAROL_KEY):
        assert (await client.call(VALID, key=key))[0] == 200
    stats = (await client.status())["stats"]
    assert (stats["today_requests"], stats["today_tokens"]) == (4, 60)
    common = [
        f"--store={url}",
        f"--users-file={senv.users_file}",
        f"--data-dir={tmp_path / 'elsewhere'}",
        "--timezone=Asia/Shanghai",
        "--format=json",
    ]
    day = senv.gateways[0].clock.today()
    rows = usage_rows(admin("usage", *common))
    assert rows == [
        {"date": day, "user": "alice", "requests": 3, "tokens": 45},
        {"date": day, "user": "carol", "requests": 1, "tokens": 15},
    ]
    listed = {r["name"]: r for r in json.loads(admin("user", "list", *common))}
    assert (listed["alice"]["requests_today"], listed["alice"]["tokens_today"]) == (3, 45)
    assert listed["alice"]["requests_left"] == 20 - 3
    assert (listed["carol"]["requests_today"], listed["carol"]["tokens_today"]) == (1, 15)
    assert listed["bob"]["requests_today"] == 0
    # Nothing was written to the data dir: the store is Redis.
    assert not (tmp_path / "elsewhere").exists()
    # A reset from the command line is seen by the gateway at once.
    admin("user", "reset", "alice", *common[:-1])
    rows = usage_rows(admin("usage", *common))
    assert rows[0] == {"date": day, "user": "alice", "requests": 3, "tokens": 45}
    listed = {r["name"]: r for r in json.loads(admin("user", "list", *common))}
    assert listed["alice"]["requests_today"] == 0
    counts = await senv.gateways[0].store.counts("alice", day)
    assert counts == Counts(0, 0, 0, 0)
