"""Hardening of access and files: keys and routes judged from the headers alone, a memory bound
for bodies in flight, nothing on disk and little in the log for strangers, throttled admin key
guessing, server-side admin sessions, private data files that follow no symlink, and user names
and plain keys that are refused when they cannot be shown or compared safely."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import tornado.httpclient
import yaml
from conftest import (
    ALICE_KEY,
    BOB_KEY,
    KEY_ENV,
    ROOT,
    Client,
    Env,
    Proc,
    post,
    proc_args,
    users_yaml,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from playwright.async_api import async_playwright
from test_admin_web import ADMIN_KEY, Browser, _chromium, admin_page, launch_chromium

import gateway

MiB = 1024 * 1024
DOT_KEY = "sk-dot-CANARY-3f1a2b3c4d5e"
DOTDOT_KEY = "sk-dotdot-CANARY-6a7b8c9d0e1f"


def port_of(client: Client) -> int:
    return int(client.base.rsplit(":", 1)[1])


async def open_request(
    port: int, path: str, headers: dict[str, str], length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that has sent a POST's request line and headers, and no body byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def read_answer(
    reader: asyncio.StreamReader, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    """Status line, headers and the Content-Length body of one answer, within `timeout`."""

    async def read() -> tuple[int, dict[str, str], bytes]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        first, *rest = head.split("\r\n")
        headers = {}
        for line in rest:
            if line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(first.split(" ")[1]), headers, body

    return await asyncio.wait_for(read(), timeout)


def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


# ---------------------------------------------------------------- 3. headers first, body memory


async def test_key_and_route_are_refused_from_the_headers_alone(senv: Env) -> None:
    """Unknown path, missing/unknown/disabled key: a complete JSON answer before any body byte."""
    client = await senv.start()
    port = port_of(client)
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/nothing", {}, 404),
        ("/api/call.php", {}, 401),
        ("/api/call.php", {"X-API-Key": "sk-unknown-CANARY-77aa88bb99"}, 401),
        ("/api/call.php", {"X-API-Key": BOB_KEY}, 401),
        ("/v1/chat/completions", {"Authorization": "Bearer wrong"}, 401),
    ]
    for path, headers, want in cases:
        reader, writer = await open_request(port, path, headers, 8_000_000)
        try:
            status, head, body = await read_answer(reader, 2.0)
        except TimeoutError:
            raise AssertionError(f"POST {path} {headers}: no answer without the body") from None
        finally:
            close(writer)
        assert status == want, (path, headers, body)
        assert head["content-type"].startswith("application/json")
        doc = json.loads(body)
        if path.startswith("/v1/"):
            assert "success" not in doc
            assert doc["error"]["type"] == "authentication_error"
            assert doc["error"]["code"] == "invalid_api_key"
        elif want == 404:
            assert (doc["success"], doc["message"]) == (False, "接口不存在")
        else:
            assert (doc["success"], doc["message"]) == (False, "API Key无效或缺失")


async def test_bodies_in_flight_share_one_memory_bound(senv: Env) -> None:
    """Past --max-body-memory a new body is refused at once with 503 队列已满 and Retry-After."""
    client = await senv.start(max_body_memory=1_000_000, max_body_size=900_000)
    port = port_of(client)
    key = {"X-API-Key": ALICE_KEY}
    held = []
    refused = None
    # Uploads announcing 600,000 bytes that send only their first 4 KB and stay open: the
    # first is admitted, and by the third at the latest one is refused before its body.
    for _ in range(3):
        reader, writer = await open_request(port, "/api/call.php", key, 600_000)
        try:
            refused = await read_answer(reader, 0.5)
        except TimeoutError:  # admitted: waiting for the rest of its body
            writer.write(b'{"model": "gpt-3.5-turbo", "pad": "' + b"x" * 4000)
            await writer.drain()
            held.append((reader, writer))
            continue
        close(writer)
        break
    assert refused is not None, "three bodies of 600,000 bytes admitted under 1,000,000"
    assert 1 <= len(held) <= 2
    status, head, body = refused
    assert status == 503, body
    doc = json.loads(body)
    assert (doc["success"], doc["message"]) == (False, "队列已满")
    assert int(head["retry-after"]) >= 1
    for reader, _ in held:  # the admitted ones are still waiting, unanswered
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
    for _, writer in held:
        close(writer)
    deadline = time.monotonic() + 3
    while True:  # the closed uploads give their memory back
        status, doc, _ = await client.call()
        if status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == 200, doc


def _vm_kib(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


async def upload(port: int, path: str, headers: dict[str, str], body: bytes) -> int | None:
    """Send a whole body while reading; the answer's status (None: no answer came).

    A plain socket, not a stream: a refused upload is answered and closed while the body is
    still being sent, and the failed send must not throw away the answer already received.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")

    async def send() -> None:
        view = memoryview(body)
        try:
            for i in range(0, len(view), 256 * 1024):
                await loop.sock_sendall(sock, view[i : i + 256 * 1024])
        except OSError:
            pass  # answered early and closed: the rest of the body is not wanted

    async def receive() -> int | None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await loop.sock_recv(sock, 65536)
            if not piece:
                return None
            data += piece
        head, rest = data.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(rest) < int(length[1]):
            piece = await loop.sock_recv(sock, 65536)
            if not piece:
                return None
            rest += piece
        return int(head.split(b" ")[1])

    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        sending = asyncio.ensure_future(send())
        try:
            return await asyncio.wait_for(receive(), 25)
        except OSError:
            return None
        finally:
            sending.cancel()
    finally:
        sock.close()


@pytest.mark.slow
async def test_big_uploads_keep_memory_bounded(penv: Env, procs, tmp_path: Path) -> None:
    """50+50 concurrent 8 MB uploads: peak RSS grows less than 3 x --max-body-memory + 40 MiB."""
    gw = procs(proc_args(penv, "--max-body-memory=67108864"), tmp_path / "gw.log", KEY_ENV)
    await gw.ready()
    pid = gw.proc.pid
    try:  # start the peak (VmHWM) over from the resting size
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass
    before = _vm_kib(pid)
    body = b"x" * 8_000_000  # junk: no valid JSON
    bad = await asyncio.gather(
        *(
            upload(gw.port, "/api/call.php", {"X-API-Key": f"sk-bad-{i:04d}-guess"}, body)
            if i % 2
            else upload(
                gw.port, "/v1/chat/completions", {"Authorization": f"Bearer sk-bad-{i:04d}"}, body
            )
            for i in range(50)
        )
    )
    assert bad == [401] * 50
    good = await asyncio.gather(
        *(upload(gw.port, "/api/call.php", {"X-API-Key": ALICE_KEY}, body) for _ in range(50))
    )
    counts = Counter(good)
    assert set(counts) <= {200, 400, 503}, counts
    assert counts[503] > 25, counts
    after = _vm_kib(pid)
    growth = (after["VmHWM"] - before["VmRSS"]) * 1024
    print(
        f"RSS {before['VmRSS'] / 1024:.0f} MiB at rest, peak {after['VmHWM'] / 1024:.0f} MiB:"
        f" growth {growth / MiB:.0f} MiB; answers {dict(counts)}"
    )
    assert growth < 3 * 64 * MiB + 40 * MiB


# ---------------------------------------------------------------- 4. strangers: no disk, few lines


def data_sizes(data_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(data_dir)): p.stat().st_size for p in data_dir.rglob("*") if p.is_file()
    }


@pytest.mark.slow
async def test_strangers_add_nothing_on_disk_and_few_log_lines(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 requests without a valid key: 0 bytes under data/, at most 30 log lines about 401s."""
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    client = await senv.start()
    before = data_sizes(senv.data_dir)
    gate = asyncio.Semaphore(50)

    async def stranger(i: int) -> int:
        async with gate:
            if i % 20 == 0:
                return (await client.call(key=f"sk-wrong-{i:05d}-CANARY", path="/nothing"))[0]
            if i % 20 == 1:
                return (await client.call(key=None))[0]
            if i % 2:
                return (await client.call(key=f"sk-wrong-{i:05d}-CANARY"))[0]
            bearer = {"Authorization": f"Bearer sk-wrong-{i:05d}-CANARY"}
            return (await client.call(key=None, path="/v1/chat/completions", headers=bearer))[0]

    with caplog.at_level(logging.INFO):
        first = len(caplog.records)
        statuses = await asyncio.gather(*(stranger(i) for i in range(2000)))
        flood = caplog.records[first:]
    assert Counter(statuses) == {401: 1900, 404: 100}
    await asyncio.sleep(0.3)
    assert data_sizes(senv.data_dir) == before
    lines = [r.getMessage() for r in flood if re.search(r"\b401\b", r.getMessage())]
    assert len(lines) <= 30, lines[:40]

    # A user's own answers, 200s and the 429 past the limit, are still in the call log.
    assert [(await client.call())[0] for _ in range(3)] == [200, 200, 429]
    day = senv.gateways[0].clock.today()
    log_lines = (senv.data_dir / "calls" / f"{day}.jsonl").read_text().splitlines()
    calls = [json.loads(line) for line in log_lines]
    assert [(c["user"], c["status"]) for c in calls] == [
        ("alice", 200),
        ("alice", 200),
        ("alice", 429),
    ]


# ---------------------------------------------------------------- 5. admin key guessing


async def test_admin_key_guessing_is_throttled_whatever_the_concurrency(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Concurrent wrong admin keys: at most 5 evaluated, the rest 429 + Retry-After, fast."""
    with caplog.at_level(logging.INFO):
        client = await senv.start(admin_key=ADMIN_KEY)
        b = Browser(client)
        token = await b.xsrf()
        answers = await asyncio.gather(
            *(
                b.request("/admin/login", "POST", f"_xsrf={token}&key=wrong-admin-key-{i:04d}")
                for i in range(20)
            )
        )
        evaluated = [a for a in answers if a[0] == 403]
        throttled = [a for a in answers if a[0] == 429]
        assert len(evaluated) + len(throttled) == 20, [a[0] for a in answers]
        assert 1 <= len(evaluated) <= 5
        for _, html, _ in evaluated:
            assert 'type="password"' in html  # the login page again
        for _, _, headers in throttled:
            assert int(headers["Retry-After"]) >= 1
        # Throttled attempts are not evaluated: the right key now is refused too.
        code, _, headers = await b.request("/admin/login", "POST", f"_xsrf={token}&key={ADMIN_KEY}")
        assert code == 429 and int(headers["Retry-After"]) >= 1
        assert "gateway_admin" not in b.cookies

        metrics = await senv.start(admin_key=ADMIN_KEY)
        t0 = time.monotonic()
        responses = await asyncio.gather(
            *(
                senv.http.fetch(
                    metrics.base + "/metrics",
                    headers={"Authorization": f"Bearer wrong-metrics-key-{i:04d}"},
                    raise_error=False,
                    request_timeout=10,
                )
                for i in range(200)
            )
        )
        elapsed = time.monotonic() - t0
    codes = Counter(r.code for r in responses)
    assert set(codes) <= {401, 429}, codes
    assert 1 <= codes[401] <= 5, codes
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.code == 429)
    assert elapsed < 5, f"200 answers took {elapsed:.1f} s"
    warnings = [r.getMessage().lower() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("admin login" in m for m in warnings), warnings[:20]
    assert any("metrics" in m for m in warnings), warnings[:20]

    fresh = Browser(await senv.start(admin_key=ADMIN_KEY))
    assert await fresh.login() == 303
    assert (await fresh.request("/admin/api/state"))[0] == 200


# ---------------------------------------------------------------- 6. server-side sessions


async def test_logout_ends_the_session_on_the_server(senv: Env) -> None:
    """After logout a replayed session cookie gets 401 and cannot reset a user's counters."""
    client = await senv.start(admin_key=ADMIN_KEY)
    assert (await client.call())[0] == 200
    b = Browser(client)
    assert await b.login() == 303
    session = b.cookies["gateway_admin"]
    assert (await b.request("/admin/api/state"))[0] == 200
    token = await b.xsrf()
    assert (await b.request("/admin/logout", "POST", f"_xsrf={token}"))[0] == 303
    b.cookies["gateway_admin"] = session  # replayed, with a valid XSRF cookie and token
    token = await b.xsrf()
    assert (await b.request("/admin/api/state"))[0] == 401
    reset = await b.request("/admin/api/users/alice/reset", "POST", "", X_XSRFToken=token)
    assert reset[0] == 401
    # Not reset: alice's next call is her second of the day against the limit.
    status, doc, _ = await client.call()
    assert status == 200
    assert doc["data"]["daily_limits"]["requests"]["used"] == 2
    assert (await client.status())["stats"]["today_requests"] == 2


async def test_admin_session_expires_after_12_hours_on_the_gateway_clock(senv: Env) -> None:
    """A login is refused (401) 12 hours and 1 second after it, by the gateway's own clock."""
    client = await senv.start(admin_key=ADMIN_KEY)
    b = Browser(client)
    assert await b.login() == 303
    assert (await b.request("/admin/api/state"))[0] == 200
    senv.clock.t += 12 * 3600 + 1
    assert (await b.request("/admin/api/state"))[0] == 401


# ---------------------------------------------------------------- 9. file modes, symlinks


def assert_private(data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / "owners").is_dir() and (data_dir / "calls").is_dir()
    files = 0
    for path in data_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not path.is_symlink(), path
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            files += 1
            assert mode == 0o600, (path, oct(mode))
    assert files >= 4  # journal, snapshot, a lock, the call log


@pytest.mark.slow
async def test_data_files_are_private_under_umask_000(penv: Env, procs, tmp_path: Path) -> None:
    """Under umask 000 data/ and its folders are 0700 and every file in them 0600."""
    assert not penv.data_dir.exists()
    gw = procs(proc_args(penv), tmp_path / "gw.log", KEY_ENV, umask=0)
    await gw.ready()
    assert (await post(penv.http, gw.base))[0] == 200
    await asyncio.sleep(2.5)  # a periodic snapshot of the new charge
    assert_private(penv.data_dir)
    gw.kill(signal.SIGTERM)
    assert await gw.wait() == 0
    assert_private(penv.data_dir)


def shanghai_days() -> list[str]:
    """Today in Asia/Shanghai (the tests' --timezone), and tomorrow in case midnight passes."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return [today.isoformat(), (today + timedelta(days=1)).isoformat()]


async def up_or_exit_status(p: Proc, http: tornado.httpclient.AsyncHTTPClient) -> int | None:
    """None once the process answers HTTP; its exit status if it ends first."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            return p.proc.returncode
        try:
            resp = await http.fetch(p.base + "/api/status.php", raise_error=False)
            if resp.code != 599:
                return None
        except (OSError, tornado.httpclient.HTTPClientError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("gateway neither answered nor exited")


async def test_a_symlinked_journal_is_never_followed(penv: Env, procs, tmp_path: Path) -> None:
    """data/<today>.jsonl as a dangling symlink: start refused naming it, or calls answer 500."""
    outside = tmp_path / "outside"
    outside.mkdir()
    penv.data_dir.mkdir(mode=0o700)
    days = shanghai_days()
    for day in days:
        (penv.data_dir / f"{day}.jsonl").symlink_to(outside / "evil.jsonl")
    gw = procs(proc_args(penv), tmp_path / "gw.log", KEY_ENV)
    status = await up_or_exit_status(gw, penv.http)
    if status is None:
        code, doc = await post(penv.http, gw.base)
        assert code == 500 and doc["success"] is False, (code, doc)
        gw.kill(signal.SIGTERM)
        await gw.wait()
    else:
        assert status != 0
        text = gw.log_path.read_text()
        assert any(f"{day}.jsonl" in text for day in days), text
    assert list(outside.iterdir()) == []


async def test_a_symlinked_call_log_is_never_followed(senv: Env, tmp_path: Path) -> None:
    """data/calls/<today>.jsonl as a dangling symlink: calls still answer 200, no target made."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (senv.data_dir / "calls").mkdir(parents=True, mode=0o700)
    senv.data_dir.chmod(0o700)
    for day in shanghai_days():
        (senv.data_dir / "calls" / f"{day}.jsonl").symlink_to(outside / "evil.jsonl")
    client = await senv.start()
    assert [(await client.call())[0] for _ in range(3)] == [200, 200, 200]
    await senv.stop()
    assert list(outside.iterdir()) == []


@pytest.mark.slow
async def test_snapshot_temp_names_are_never_followed(penv: Env, procs, tmp_path: Path) -> None:
    """Symlinks at the old temp names .<day>.json.<pid>.tmp: their target keeps its content."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_bytes(b"precious, not a snapshot\n")
    penv.data_dir.mkdir(mode=0o700)
    days = shanghai_days()
    try:
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    except (OSError, ValueError):
        last = os.getpid()

    def link(pid: int) -> None:
        for day in days:
            path = penv.data_dir / f".{day}.json.{pid}.tmp"
            if not path.is_symlink():
                path.symlink_to(target)

    for pid in range(last + 1, last + 1001):
        link(pid)
    gw = procs(proc_args(penv), tmp_path / "gw.log", KEY_ENV)
    link(gw.proc.pid)  # long before the interpreter has imported anything
    await gw.ready()
    for _ in range(3):
        assert (await post(penv.http, gw.base))[0] == 200
    await asyncio.sleep(2.5)  # a periodic snapshot
    gw.kill(signal.SIGTERM)
    assert await gw.wait() == 0  # a clean stop writes the snapshot
    assert target.read_bytes() == b"precious, not a snapshot\n"
    snapshot = penv.data_dir / f"{days[0]}.json"
    if not snapshot.exists():  # midnight passed during the test
        snapshot = penv.data_dir / f"{days[1]}.json"
    assert not snapshot.is_symlink()
    assert json.loads(snapshot.read_text())["users"]["alice"]["requests"] >= 1


# ---------------------------------------------------------------- 11. user names


BAD_NAMES = [
    pytest.param("bad\u2028name", id="U+2028"),
    pytest.param("bad\u2029name", id="U+2029"),
    pytest.param("bad\u0085name", id="U+0085"),
    pytest.param("bad\x9bname", id="C1-CSI"),
    pytest.param(b"bad\xffname", id="invalid-UTF-8"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_user_add_refuses_names_that_break_lines_or_terminals(
    tmp_path: Path, name: str | bytes
) -> None:
    """`user add` with a line separator, C1 control or invalid UTF-8: exit 2, one line, no edit."""
    users = tmp_path / "users.yaml"
    users.write_text(users_yaml({"alice": {"api_key": ALICE_KEY}}))
    before = users.read_bytes()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "gateway.py"),
            "user",
            "add",
            name,
            f"--users-file={users}",
            f"--data-dir={tmp_path / 'data'}",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, (done.returncode, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.strip(), err
    assert done.stdout == b""  # no key was made
    assert users.read_bytes() == before


async def login(client: Client) -> tuple[Browser, str]:
    b = Browser(client)
    assert await b.login() == 303
    return b, await b.xsrf()


async def test_dashboard_actions_by_name_in_a_json_body(senv: Env) -> None:
    """POST /admin/api/users/ACTION {"name": …} acts on users "." and ".."; the old route stays."""
    senv.write_users(
        {
            ".": {"api_key": DOT_KEY},
            "..": {"api_key": DOTDOT_KEY},
            "alice": {"api_key": ALICE_KEY},
        }
    )
    client = await senv.start(admin_key=ADMIN_KEY)
    b, token = await login(client)

    async def act(action: str, name: str, **headers: str) -> tuple[int, str]:
        code, body, _ = await b.request(
            f"/admin/api/users/{action}",
            "POST",
            json.dumps({"name": name}),
            Content_Type="application/json",
            **headers,
        )
        return code, body

    def enabled() -> dict[str, bool]:
        users = yaml.safe_load(senv.users_file.read_text())["users"]
        return {n: u.get("enabled", True) for n, u in users.items()}

    assert (await act("disable", ".."))[0] == 403  # no XSRF token
    assert enabled() == {".": True, "..": True, "alice": True}
    code, body = await act("disable", "..", X_XSRFToken=token)
    assert code == 200, body
    assert enabled() == {".": True, "..": False, "alice": True}
    assert (await client.call(key=DOTDOT_KEY))[0] == 401
    assert (await client.call(key=DOT_KEY))[0] == 200
    code, body = await act("reset", ".", X_XSRFToken=token)
    assert code == 200, body
    status, doc, _ = await client.call(key=DOT_KEY)
    assert status == 200 and doc["data"]["daily_limits"]["requests"]["used"] == 1
    assert (await act("disable", ".", X_XSRFToken=token))[0] == 200
    assert (await act("enable", "..", X_XSRFToken=token))[0] == 200
    assert enabled() == {".": False, "..": True, "alice": True}
    assert (await act("reset", "nobody", X_XSRFToken=token))[0] == 404
    # The path route still works for names that fit in a path.
    code, _, _ = await b.request("/admin/api/users/alice/disable", "POST", "", X_XSRFToken=token)
    assert code == 200
    assert enabled() == {".": False, "..": True, "alice": False}


@pytest.mark.slow
async def test_dot_dot_disable_button_in_headless_chromium(senv: Env) -> None:
    """In Chromium the ".." card's disable button disables "..", and reset works for "."."""
    chromium = _chromium()
    senv.write_users(
        {
            ".": {"api_key": DOT_KEY, "daily_request_limit": 4},
            "..": {"api_key": DOTDOT_KEY, "daily_request_limit": 4},
        }
    )
    client = await senv.start(admin_key=ADMIN_KEY)
    assert (await client.call(key=DOT_KEY))[0] == 200
    async with async_playwright() as p:
        browser = await launch_chromium(p, chromium)
        try:
            page = await admin_page(browser, client)
            await page.locator(".card[data-user='..'] button", has_text="disable").click()
            await page.wait_for_selector(".card[data-user='..'] .badge.off", timeout=5_000)
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
            dot = ".card[data-user='.'] .metric.requests .fill"
            assert await page.locator(dot).get_attribute("data-share") == "0.250"
            await page.locator(".card[data-user='.'] button", has_text="reset today").click()
            await page.wait_for_selector(
                dot + "[data-share='0.000']", state="attached", timeout=5_000
            )
            notice = await page.locator("#notice").inner_text()
        finally:
            await browser.close()
    assert notice == ""
    users = yaml.safe_load(senv.users_file.read_text())["users"]
    assert users[".."]["enabled"] is False
    assert users["."].get("enabled", True) is True


# ---------------------------------------------------------------- 12. plain keys


KEY_CORE = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\"'\\"),
    min_size=8,
    max_size=40,
)


def _refused(key: str, name: str = "mallory") -> str:
    text = users_yaml({"alice": {"api_key": ALICE_KEY}, name: {"api_key": key}})
    assume(yaml.safe_load(text)["users"][name]["api_key"] == key)
    with pytest.raises(gateway.ConfigError) as refused:
        gateway.parse_users(text)
    return str(refused.value)


@pytest.mark.parametrize("key", ["sk-ключ-123456", " sk-abcdef123456 "])
def test_non_ascii_or_padded_plain_keys_are_refused(key: str) -> None:
    """A plain api_key that is non-ASCII or has surrounding spaces: ConfigError naming the user."""
    written = f'users:\n  alice: {{api_key: {ALICE_KEY}}}\n  mallory:\n    api_key: "{key}"\n'
    assert yaml.safe_load(written)["users"]["mallory"]["api_key"] == key
    with pytest.raises(gateway.ConfigError) as refused:
        gateway.parse_users(written)
    assert "mallory" in str(refused.value) and "api_key" in str(refused.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    core=KEY_CORE,
    at=st.integers(0, 40),
    char=st.characters(min_codepoint=0x80, exclude_categories=["Cs"]),
)
def test_any_non_ascii_plain_key_is_refused(core: str, at: int, char: str) -> None:
    """Whatever non-ASCII character a plain api_key holds, the users file is refused."""
    message = _refused(core[:at] + char + core[at:])
    assert "mallory" in message and "api_key" in message


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(core=KEY_CORE, left=st.integers(0, 3), right=st.integers(0, 3))
def test_any_space_padded_plain_key_is_refused(core: str, left: int, right: int) -> None:
    """A plain api_key with leading or trailing spaces is refused; the bare key is accepted."""
    assume(left or right)
    message = _refused(" " * left + core + " " * right)
    assert "mallory" in message and "api_key" in message
    accepted = users_yaml({"mallory": {"api_key": core}})
    assert list(gateway.parse_users(accepted)) == ["mallory"]


async def test_a_running_gateway_keeps_its_users_on_a_bad_plain_key(
    senv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Editing in a padded or non-ASCII plain key: ERROR "users file not reloaded", users stay."""
    senv.write_users({"alice": {"api_key": ALICE_KEY}})
    client = await senv.start()
    with caplog.at_level(logging.ERROR, logger="gateway"):
        for n, key in enumerate([" sk-abcdef123456 ", "sk-ключ-123456"], 1):
            senv.users_file.write_text(f'users:\n  alice:\n    api_key: "{key}"\n')
            deadline = time.monotonic() + 3
            while True:
                errors = [
                    r
                    for r in caplog.records
                    if r.levelno == logging.ERROR and "users file not reloaded" in r.getMessage()
                ]
                if len(errors) >= n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert len(errors) == n, [r.getMessage() for r in caplog.records]
            assert "alice" in errors[-1].getMessage()
            assert (await client.call())[0] == 200  # the last good users
            assert (await client.call(key="sk-abcdef123456"))[0] == 401


@pytest.mark.parametrize("key", ["sk-ключ-123456", " sk-abcdef123456 "])
async def test_a_process_refuses_to_start_with_a_bad_plain_key(
    penv: Env, procs, tmp_path: Path, key: str
) -> None:
    """`python gateway.py` with a non-ASCII or padded plain key exits with status 2."""
    penv.users_file.write_text(f'users:\n  mallory:\n    api_key: "{key}"\n')
    gw = procs(proc_args(penv), tmp_path / "gw.log", KEY_ENV)
    assert await up_or_exit_status(gw, penv.http) == 2
    assert "mallory" in gw.log_path.read_text()
