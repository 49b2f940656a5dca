"""Scaling out, side by side in one run:

    python bench/scale.py [--seconds 5] [--repeat 3]

1. The Redis store against the file store, one gateway process each, interleaved rounds:
   throughput, CPU per call, and Redis commands per call (from INFO commandstats).
2. --processes=2 against one process (file store), interleaved rounds.
3. Two gateway processes with separate data dirs on one Redis ("two machines"): 20 rounds of
   200 concurrent calls, each round for a user with a random daily_request_limit: admitted ==
   limit, every round.
4. kill -9 of one of two processes while its calls are in flight: how long until the
   survivor sees its slots free, and whether the counts stay exact.
5. Redis stopped for 10 s under load, then started again (append-only, fsync always): no
   call relayed while it is down, no answer but 200, 429 and the documented 500, and the
   counts exact afterwards.
A redis-server is started on a free port and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Target
from run import AUTH, CHAT, Bench, Proc, free_port


def redis_stats(port: int) -> dict[str, int]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "commandstats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[8:].split(":", 1)
            stats[name] = int(rest.split("calls=")[1].split(",")[0])
    return stats


async def call(port: int, key: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = Target(port, "/api/call.php", CHAT, {**AUTH, "X-API-Key": key, "Connection": "close"})
    writer.write(t.request())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def answer(port: int, key: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = Target(port, "/api/call.php", CHAT, {**AUTH, "X-API-Key": key, "Connection": "close"})
    writer.write(t.request())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def upstream_answered(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += s.recv(4096)
    return int(json.loads(data.split(b"\r\n\r\n", 1)[1])["chat"])


def redis_down_under_load(bench: Bench, up: Proc) -> str:
    """Stop Redis for 10 s while 16 clients call without pause, then start it again."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(dir=bench.tmp, prefix="redis-"))
    argv = [
        "redis-server", "--port", str(port), "--dir", str(workdir), "--save", "",
        "--appendonly", "yes", "--appendfsync", "always",
    ]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    key = "sk-redis-down-0000"
    users = bench.users_file(
        1, f"  d: {{api_key: {key}, daily_request_limit: {10**6}, daily_token_limit: {10**9}}}\n"
    )
    gw = bench.gateway(
        up, client="curl", users=users, extra=(f"--store=redis://127.0.0.1:{port}/0",)
    )
    phase = ["up"]
    seen: dict[str, dict[str, int]] = {"up": {}, "down": {}, "back": {}}
    ok = [0]
    undocumented: list[str] = []

    async def client(stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = phase[0]
            code, body = await answer(gw.port, key)
            label = str(code)
            if code == 200:
                ok[0] += 1
            elif code == 500:
                try:
                    error = json.loads(body)["data"]["error"]
                except (ValueError, KeyError, TypeError):
                    error = ""
                if "usage store is unavailable" not in error:
                    undocumented.append(body[:200].decode("utf-8", "replace"))
                    label = "500 (other)"
            seen[now][label] = seen[now].get(label, 0) + 1

    async def scenario() -> tuple[int, int, float]:
        nonlocal server
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(client(stop)) for _ in range(16)]
        await asyncio.sleep(3)
        phase[0] = "down"
        subprocess.run(["redis-cli", "-p", str(port), "shutdown"], capture_output=True)
        server.wait(10)
        await asyncio.sleep(0.5)  # calls admitted just before the stop finish meanwhile
        relayed_from = upstream_answered(up.port)
        await asyncio.sleep(9.5)
        relayed = upstream_answered(up.port) - relayed_from
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        phase[0] = "back"
        while seen["back"].get("200", 0) == 0 and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.05)
        resumed = time.monotonic() - t0
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients)
        st = await status(gw.port)
        return relayed, st["stats"]["today_requests"], resumed

    try:
        relayed, charged, resumed = asyncio.run(scenario())
    finally:
        gw.stop()
        server.terminate()
        server.wait(10)
    return (
        f"Redis stopped for 10 s under load: {relayed} calls relayed while it was down; "
        f"answers up {seen['up']}, down {seen['down']}, back {seen['back']} "
        f"({len(undocumented)} undocumented); service back {resumed:.2f} s after Redis started; "
        f"{charged} charged for {ok[0]} answered 200 "
        f"({'exact' if charged == ok[0] else 'NOT exact'})"
    )


async def status(port: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/status.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["data"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tool", default="auto")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(repeat=args.repeat, tool=args.tool, smoke=False))
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    out: list[str] = []
    try:
        time.sleep(0.5)
        up = bench.upstream()
        url = f"redis://127.0.0.1:{rport}/0"
        target = lambda p: Target(p.port, "/api/call.php", CHAT, AUTH)  # noqa: E731
        file_gw = bench.gateway(up, client="curl")
        redis_gw = bench.gateway(up, client="curl", extra=(f"--store={url}?prefix=bench",))
        before = redis_stats(rport)
        rows = bench.measure_all(
            "store",
            [
                ("file store", file_gw, target(file_gw)),
                ("redis store", redis_gw, target(redis_gw)),
            ],
            32,
            args.seconds,
        )
        after = redis_stats(rport)
        calls = max(1, asyncio.run(status(redis_gw.port))["stats"]["today_requests"])
        scripts = after.get("evalsha", 0) - before.get("evalsha", 0)
        commands = sum(after.values()) - sum(before.values()) - scripts
        f, r = rows
        out.append(
            f"redis / file throughput: {r['rps'] / f['rps']:.2f}x ({r['rps']:.0f} vs {f['rps']:.0f}"
            f" req/s); gateway CPU {r['cpu_ms_per_req']} vs {f['cpu_ms_per_req']} ms per call; "
            f"{scripts / calls:.2f} script calls per call (reserve, settle; pipelined), "
            f"{commands / calls:.1f} commands inside them"
        )
        file_gw.stop()
        redis_gw.stop()
        one = bench.gateway(up, client="curl")
        two = bench.gateway(up, client="curl", extra=("--processes=2",))
        rows = bench.measure_all(
            "processes",
            [("one process", one, target(one)), ("--processes=2", two, target(two))],
            64,
            args.seconds,
        )
        out.append(
            f"--processes=2 / one process: {rows[1]['rps'] / rows[0]['rps']:.2f}x "
            f"({rows[1]['rps']:.0f} vs {rows[0]['rps']:.0f} req/s)"
        )
        one.stop()
        two.stop()

        # Two "machines": separate data dirs, one Redis, users with random limits.
        rng = random.Random(11)
        limits = [rng.randint(1, 199) for _ in range(20)]
        extra = "".join(
            f"  r{i}: {{api_key: sk-round-{i:04d}-key, daily_request_limit: {n}}}\n"
            for i, n in enumerate(limits)
        )
        users = bench.users_file(1, "")
        users.write_text(users.read_text() + extra)
        store = f"--store={url}?prefix=machines"
        a = bench.gateway(up, client="curl", users=users, extra=(store,))
        b = bench.gateway(up, client="curl", users=users, extra=(store,))
        exact = 0
        for i, n in enumerate(limits):
            key = f"sk-round-{i:04d}-key"

            async def burst(key: str = key) -> list[int]:
                calls = [call((a, b)[j % 2].port, key) for j in range(200)]
                return list(await asyncio.wait_for(asyncio.gather(*calls), 60))

            statuses = asyncio.run(burst())
            exact += statuses.count(200) == n and statuses.count(429) == 200 - n
        out.append(f"two machines on one Redis: {exact}/20 rounds of 200 calls exact")

        # kill -9 of one process with calls in flight.
        # A slow upstream (3 s a call), started by hand: the benchmark's readiness probe would
        # itself wait 3 s.
        slow_port = free_port()
        slow_proc = subprocess.Popen(
            [sys.executable, "bench/fake_upstream.py", f"--port={slow_port}", "--delay=3.0"],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        slow = Proc("slow-upstream", slow_port, slow_proc)
        bench.procs.append(slow)
        users2 = bench.users_file(1, "  k: {api_key: sk-kill-test-0000, daily_request_limit: 10}\n")
        store = f"--store={url}?prefix=kill"
        live = bench.gateway(slow, client="curl", users=users2, extra=(store,))
        doomed = bench.gateway(slow, client="curl", users=users2, extra=(store,))

        async def kill_test() -> tuple[float, int, list[int]]:
            inflight = [
                asyncio.ensure_future(call(doomed.port, "sk-kill-test-0000")) for _ in range(6)
            ]
            await asyncio.sleep(1.0)
            doomed.popen.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            freed = -1.0
            while time.monotonic() - t0 < 15:
                # A refusal comes at once, an admitted call after the upstream's 3 s: the
                # slots were free when the first admitted call was sent.
                sent = time.monotonic()
                if await call(live.port, "sk-kill-test-0000") == 200:
                    freed = sent - t0
                    break
                await asyncio.sleep(0.2)
            for f in inflight:
                f.cancel()
            rest = await asyncio.gather(*(call(live.port, "sk-kill-test-0000") for _ in range(12)))
            st = await status(live.port)
            return freed, st["stats"]["today_requests"], rest

        # 4 of the 10 slots are taken by the survivor's own calls first, so the killed
        # process's 6 hold the rest: only their expiry lets another call in.
        async def fill() -> list[asyncio.Future[int]]:
            return [asyncio.ensure_future(call(live.port, "sk-kill-test-0000")) for _ in range(4)]

        async def scenario() -> tuple[float, int, list[int]]:
            own = await fill()
            result = await kill_test()
            await asyncio.gather(*own)
            return result

        freed, charged, rest = asyncio.run(scenario())
        out.append(
            f"kill -9 of one of two processes: its slots free after {freed:.1f} s "
            f"(target: within 5 s); afterwards {rest.count(200)} more calls admitted, "
            f"{charged} charged in all for a limit of 10"
        )
        live.stop()
        doomed.stop()
        out.append(redis_down_under_load(bench, up))
    finally:
        bench.stop_all()
        redis.terminate()
        redis.wait(10)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
