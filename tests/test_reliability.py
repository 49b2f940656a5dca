"""Faults and load: limits stay exact, nothing charged is lost, bad input never costs anything."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    ALICE_KEY,
    ALL_SECRETS,
    CAROL_KEY,
    KEY_ENV,
    ROOT,
    VALID,
    Env,
    Proc,
    assert_data_parses,
    data_text,
    free_port,
    post,
    proc_args,
    status,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway


def round_users(limits: list[int]) -> dict[str, dict[str, object]]:
    return {
        f"r{i}": {"api_key": f"sk-round-{i:04d}-key", "daily_request_limit": limit}
        for i, limit in enumerate(limits)
    }


# ---------------------------------------------------------------- exact limits, many rounds


@pytest.mark.slow
async def test_twenty_rounds_of_200_at_once_one_process(env: Env) -> None:
    rng = random.Random(20261126)
    limits = [rng.randint(1, 100) for _ in range(20)]
    env.write_users(round_users(limits))
    env.upstream.delay = 0.01
    client = await env.start(concurrency=200, queue_size=200)
    for i, limit in enumerate(limits):
        key = f"sk-round-{i:04d}-key"
        results = await asyncio.gather(*(client.call(VALID, key=key) for _ in range(200)))
        codes = [r[0] for r in results]
        assert codes.count(200) == limit, (i, limit)
        assert codes.count(429) == 200 - limit
    stats = (await client.status())["stats"]
    assert stats["today_requests"] == sum(limits)


@pytest.mark.slow
async def test_twenty_rounds_of_200_at_once_two_processes(penv: Env, procs, tmp_path: Path) -> None:
    rng = random.Random(7)
    limits = [rng.randint(1, 100) for _ in range(20)]
    penv.write_users(round_users(limits))
    penv.upstream.delay = 0.01
    extra = ("--concurrency=200", "--queue-size=200")
    a = procs(proc_args(penv, *extra), tmp_path / "a.log", KEY_ENV)
    b = procs(proc_args(penv, *extra), tmp_path / "b.log", KEY_ENV)
    await asyncio.gather(a.ready(), b.ready())
    for i, limit in enumerate(limits):
        key = f"sk-round-{i:04d}-key"
        results = await asyncio.gather(
            *(post(penv.http, (a if n % 2 else b).base, key) for n in range(200))
        )
        codes = [c for c, _ in results]
        assert codes.count(200) == limit, (i, limit, codes.count(599))
        assert codes.count(429) == 200 - limit
    assert len(penv.upstream.requests) == sum(limits)


# ---------------------------------------------------------------- crash loop


@pytest.mark.slow
async def test_crash_loop_twenty_kill_9_cycles(penv: Env, procs, tmp_path: Path) -> None:
    penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 10**9}})
    penv.upstream.delay = 0.005
    rng = random.Random(99)
    answered = 0
    for cycle in range(20):
        p: Proc = procs(proc_args(penv), tmp_path / f"c{cycle}.log", KEY_ENV)
        await p.ready()
        codes: list[int] = []

        async def client_loop(p: Proc = p, codes: list[int] = codes) -> None:
            while True:
                code, _ = await post(penv.http, p.base)
                codes.append(code)
                if code == 599:
                    return

        loops = [asyncio.ensure_future(client_loop()) for _ in range(8)]
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        p.kill(signal.SIGKILL)
        await asyncio.gather(*loops)
        await p.wait()
        assert set(codes) <= {200, 599}
        ok, cut = codes.count(200), codes.count(599)
        assert_data_parses(penv.data_dir)
        t0 = time.monotonic()
        q = procs(proc_args(penv), tmp_path / f"r{cycle}.log", KEY_ENV)
        await q.ready(timeout=2)
        assert time.monotonic() - t0 < 2  # serving again within 2 s
        recorded = (await status(penv.http, q.base))["today_requests"]
        assert answered + ok <= recorded <= answered + ok + cut
        answered = recorded
        q.kill(signal.SIGTERM)
        assert await q.wait() == 0
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert "gateway listening" in logs
    for secret in ALL_SECRETS:
        assert secret not in logs
        assert secret not in data_text(penv.data_dir)


# ---------------------------------------------------------------- power loss


STEP_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import gateway
step = int(sys.argv[1])
calls = {{"n": 0}}
real = {{"write": os.write, "fsync": os.fsync, "replace": os.replace}}
def crash_at(name):
    def f(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            os._exit(9)  # the machine stops here
        return real[name](*a, **k)
    return f
os.write = crash_at("write"); os.fsync = crash_at("fsync"); os.replace = crash_at("replace")
gateway.atomic_write(gateway.Path(sys.argv[2]), b'{{"version": "new"}}')
"""


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])
def test_snapshot_write_crash_at_every_step_leaves_old_or_new(tmp_path: Path, step: int) -> None:
    """Steps: write data, fsync file, rename, fsync dir (and past the end: no crash)."""
    target = tmp_path / "2026-11-26.json"
    target.write_text('{"version": "old"}')
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(step), str(target)], timeout=30)
    assert proc.returncode in (0, 9)
    assert json.loads(target.read_text())["version"] in ("old", "new")
    if proc.returncode == 0:
        assert json.loads(target.read_text())["version"] == "new"


async def test_record_cut_short_is_skipped_and_a_damaged_one_fails_closed(env: Env) -> None:
    client = await env.start()
    for key in (ALICE_KEY, CAROL_KEY):
        assert (await client.call(VALID, key=key))[0] == 200
    day = env.gateways[0].clock.today()
    await env.stop()
    journal = env.data_dir / f"{day}.jsonl"
    (env.data_dir / f"{day}.json").unlink()  # make the restart read the journal
    with journal.open("ab") as f:
        f.write(b'\n{"u":"alice","k":"s","id":"lost-1","n":1')  # power cut mid-record
    client = await env.start()
    # never acknowledged, so skipped: alice keeps her count and her service
    code, doc, _ = await client.call(VALID)
    assert code == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 2
    await env.stop()
    with journal.open("ab") as f:
        f.write(b'\n{"u":"carol","k":"s","id":"bad-1","n":\xff\xfe}\n')  # complete but damaged
    (env.data_dir / f"{day}.json").unlink()
    client = await env.start()
    assert (await client.call(VALID, key=CAROL_KEY))[0] == 500  # refused, not reset
    assert (await client.call(VALID))[0] == 200  # alice unaffected
    assert (await client.status())["stats"]["today_requests"] == 4


# ---------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


async def test_disk_full_fails_clearly_charges_nothing_and_recovers(
    env: Env, small_disk: Path
) -> None:
    client = await env.start(data_dir=str(small_disk / "data"))
    assert (await client.call(VALID))[0] == 200
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # the disk is full
    finally:
        os.close(fd)
    # The journal's last page may still hold a few records; after that, every call fails.
    codes = []
    for _ in range(100):
        code, doc, _ = await client.call(VALID)
        codes.append(code)
        if code != 200:
            assert code == 500
            assert doc["message"] == "系统配置错误"
            assert "usage store" in doc["data"]["error"]
    first_failure = codes.index(500)
    assert codes[first_failure:] == [500] * (100 - first_failure)
    charged = 1 + first_failure
    filler.unlink()
    code, doc, _ = await client.call(VALID)
    assert code == 200
    # the failed calls cost nothing
    assert doc["data"]["daily_limits"]["requests"]["used"] == charged + 1


async def test_read_only_journal_fails_clearly_and_recovers(env: Env) -> None:
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    journal = env.data_dir / f"{env.gateways[0].clock.today()}.jsonl"
    # chattr +i: not even root may write, through the gateway's open file too
    if subprocess.run(["chattr", "+i", str(journal)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable attribute (chattr +i)")
    try:
        for _ in range(3):
            code, doc, _ = await client.call(VALID)
            assert code == 500
            assert doc["message"] == "系统配置错误"
            assert "usage store" in doc["data"]["error"]
    finally:
        subprocess.run(["chattr", "-i", str(journal)], check=True)
    code, doc, _ = await client.call(VALID)
    assert code == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 2  # the refused calls cost nothing


async def test_oversized_headers_get_a_431_and_cost_nothing(env: Env) -> None:
    client = await env.start()
    for path in ("/api/call.php", "/v1/chat/completions"):
        code, doc, _ = await client.call(VALID, path=path, headers={"X-Pad": "a" * 64 * 1024})
        assert code == 431
        message = doc["message"] if "message" in doc else doc["error"]["message"]
        assert message.startswith("请求头过大")
    # far beyond the limit Tornado drops the connection without reading on
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n")
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass  # closed with the rest unread: a reset
    writer.close()
    assert (await client.status())["stats"]["today_requests"] == 0


# ---------------------------------------------------------------- backpressure and slow clients


@pytest.mark.slow
async def test_backpressure_overflow_is_refused_fast_and_free(env: Env) -> None:
    env.upstream.delay = 1.0
    # One user may fill the whole room here (the per-user share is tested in test_policy).
    client = await env.start(concurrency=4, queue_size=8, user_queue_share=1.0)

    async def timed() -> tuple[int, float]:
        t0 = time.monotonic()
        status, _, _ = await client.call(VALID)
        return status, time.monotonic() - t0

    results = await asyncio.gather(*(timed() for _ in range(5 * (4 + 8))))
    ok = [t for s, t in results if s == 200]
    full = [t for s, t in results if s == 503]
    assert len(ok) == 12 and len(full) == 48
    # refused at once, not after waiting for the queue (the first call takes 1 s upstream)
    assert max(full) < 0.5 < min(ok)
    assert (await client.status())["stats"]["today_requests"] == 12


@pytest.mark.slow
async def test_300_slowloris_sockets_do_not_hold_up_a_normal_client(env: Env) -> None:
    client = await env.start(idle_timeout=1.0, body_timeout=1.0)
    port = int(client.base.rsplit(":", 1)[1])
    slow = []
    for n in range(300):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/call.php HTTP/1.1\r\nHost: x\r\n" if n % 2 else b"GE")
        slow.append((reader, writer))
    latencies = []
    for _ in range(40):
        t0 = time.monotonic()
        assert (await client.call(VALID, key=CAROL_KEY))[0] == 200
        latencies.append(time.monotonic() - t0)
    latencies.sort()
    assert latencies[int(0.99 * len(latencies))] < 0.2
    closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in slow))
    assert all(data == b"" for data in closed)  # every slow socket was closed by the server
    for _, w in slow:
        w.close()


# ---------------------------------------------------------------- upstream faults


@pytest.mark.slow
async def test_a_thousand_upstream_faults_leak_no_memory(penv: Env, procs, tmp_path: Path) -> None:
    penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 10**6}})
    penv.upstream.status = 503
    p = procs(proc_args(penv, "--concurrency=16"), tmp_path / "faults.log", KEY_ENV)
    await p.ready()

    def rss_kb() -> int:
        text = Path(f"/proc/{p.proc.pid}/status").read_text()
        return int(next(ln for ln in text.splitlines() if ln.startswith("VmRSS")).split()[1])

    async def burst(n: int) -> list[int]:
        return [c for c, _ in await asyncio.gather(*(post(penv.http, p.base) for _ in range(n)))]

    await burst(200)  # warm up
    before = rss_kb()
    codes = []
    for _ in range(10):
        codes += await burst(100)
    assert codes == [502] * 1000
    assert rss_kb() - before < 20 * 1024


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        ("refused", None, "connection failed: "),
        ("reset", None, "connection failed: "),
        ("hang", None, "timeout: "),
        ("429", 429, "upstream says no (429)"),
        ("500", 500, "upstream says no (500)"),
        ("not json", 200, "not a JSON object"),
    ],
)
@pytest.mark.slow
async def test_upstream_faults_answer_502_within_the_timeout_and_cost_nothing(
    env: Env, fault: str, status: int | None, error: str
) -> None:
    timeout = 1.0
    overrides: dict[str, object] = {"upstream_timeout": timeout}
    if fault == "refused":
        overrides["upstream_base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    elif fault == "reset":
        env.upstream.reset = True
    elif fault == "hang":
        env.upstream.delay = 30.0
    elif fault == "not json":
        env.upstream.body = b"<html>502 from a proxy</html>"
    else:
        env.upstream.status = int(fault)
        env.upstream.headers = {"Retry-After": "7"}
    client = await env.start(**overrides)
    t0 = time.monotonic()
    code, doc, _ = await client.call(VALID)
    assert time.monotonic() - t0 < timeout + 1
    assert code == 502
    assert doc["message"] == "大模型API调用失败"
    assert doc["data"]["upstream_status"] == status
    assert error in doc["data"]["error"]
    assert (await client.status())["stats"]["today_requests"] == 0


# ---------------------------------------------------------------- property-based fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_request_validation_never_fails_with_anything_but_a_400(body: bytes) -> None:
    try:
        doc = gateway.parse_json_object(body)
        gateway.validate_chat(doc)
        gateway.validate_chat_stream(doc)
    except gateway.GatewayError as e:
        assert e.status == 400
        assert e.message == "请求参数错误"
        assert isinstance(e.data, dict) and e.data["error"]


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.dictionaries(
        st.sampled_from(["defaults", "users", "x-a", "other"]),
        st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3) | JSON_VALUES,
        max_size=3,
    ).map(lambda d: json.dumps(d)),  # JSON is YAML
)


@settings(max_examples=400, deadline=None)
@given(YAML_TEXT)
def test_users_loader_refuses_with_a_config_error_or_loads(text: str) -> None:
    try:
        users = gateway.parse_users(text)
    except gateway.ConfigError as e:
        assert str(e)
        return
    for user in users.values():
        assert user.daily_request_limit >= 0 and user.daily_token_limit >= 0
        assert len(user.key_sha256) == 32
