"""Benchmark the gateway against a bare Tornado relay and the upstream itself, side by side.

    python bench/run.py            # the full comparison (about 7 minutes), results in bench/results/
    python bench/run.py --smoke    # a few seconds: every scenario once, tiny; used by the tests

Everything runs on 127.0.0.1: a fast fake upstream (bench/fake_upstream.py), bare relays
(bench/bare_relay.py, Tornado's own client and pycurl), and gateways (gateway.py) with full
accounting on. Load comes from wrk when installed, else from a Python asyncio client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Result, Target, hold_streams, percentile, run_load

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-0123456789abcdef"
CHAT = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()
AUTH = {"Content-Type": "application/json", "X-API-Key": KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Seconds until the port answers a status request (or connects, for non-gateways)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /api/status.php HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1"):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"port {port} never answered")


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (the serving processes of a
    gateway started with --processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(int(child))
    return total


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    ready_s: float = 0.0

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.procs: list[Proc] = []
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        log = open(self.tmp / f"{name}-{port}.log", "wb")
        popen = subprocess.Popen(
            [sys.executable, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        proc = Proc(name, port, popen)
        proc.ready_s = wait_port(port, popen)
        self.procs.append(proc)
        return proc

    def upstream(self, delay: float = 0.0, chunks: int = 5, chunk_delay: float = 0.0) -> Proc:
        return self.spawn(
            "upstream",
            [
                "bench/fake_upstream.py",
                "--port={port}",
                f"--delay={delay}",
                f"--chunks={chunks}",
                f"--chunk-delay={chunk_delay}",
            ],
        )

    def bare(self, upstream: Proc, client: str) -> Proc:
        return self.spawn(
            f"bare-{client}",
            [
                "bench/bare_relay.py",
                "--port={port}",
                f"--upstream=http://127.0.0.1:{upstream.port}/v1",
                f"--client={client}",
            ],
        )

    def users_file(self, n: int, extra: str = "") -> Path:
        path = self.tmp / f"users-{n}-{time.monotonic_ns()}.yaml"
        lines = [
            "users:",
            f"  bench: {{api_key: {KEY}, daily_request_limit: 1000000000, daily_token_limit: 1000000000000}}",
        ]
        for i in range(n - 1):
            digest = hashlib.sha256(f"sk-user-{i}".encode()).hexdigest()
            lines.append(f"  u{i}: {{api_key_sha256: {digest}}}")
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    def gateway(
        self,
        upstream: Proc,
        client: str = "auto",
        users: Path | None = None,
        data: Path | None = None,
        extra: tuple[str, ...] = (),
        script: str = "gateway.py",
    ) -> Proc:
        users = users or self.users_file(10)
        data = data or Path(tempfile.mkdtemp(dir=self.tmp, prefix="data-"))
        return self.spawn(
            f"gateway-{client}",
            [
                script,
                "--port={port}",
                "--host=127.0.0.1",
                f"--users-file={users}",
                f"--data-dir={data}",
                f"--upstream-base-url=http://127.0.0.1:{upstream.port}/v1",
                f"--http-client={client}",
                "--logging=warning",
                "--concurrency=256",
                "--queue-size=1024",
                *extra,
            ],
            env={"UPSTREAM_API_KEY": "sk-bench-upstream"},
        )

    def measure_all(
        self,
        section: str,
        entries: list[tuple[str, Proc, Target]],
        conns: int,
        seconds: float,
        **extra: Any,
    ) -> list[dict[str, Any]]:
        """Measure several targets in interleaved rounds and keep each one's median run.

        On a shared 2-core machine the speed drifts by 15% or more from minute to minute;
        interleaving makes the side-by-side ratios immune to that drift.
        """
        runs: dict[int, list[Result]] = {i: [] for i in range(len(entries))}
        cpu: dict[int, float] = dict.fromkeys(runs, 0.0)
        for _ in range(self.args.repeat):
            for i, (_, proc, target) in enumerate(entries):
                cpu0 = cpu_seconds(proc.popen.pid)
                runs[i].append(run_load(target, conns, seconds, self.args.tool))
                cpu[i] += cpu_seconds(proc.popen.pid) - cpu0
        rows = []
        for i, (label, proc, _) in enumerate(entries):
            result = sorted(runs[i], key=lambda r: r.rps)[len(runs[i]) // 2]
            total = sum(r.requests for r in runs[i])
            row = {
                "section": section,
                "label": label,
                "conns": conns,
                "rps": round(result.rps, 1),
                "p50_ms": round(result.p50_ms, 3),
                "p99_ms": round(result.p99_ms, 3),
                "cpu_ms_per_req": round(cpu[i] * 1000 / total, 3) if total else None,
                "rss_peak_mb": round(rss_mb(proc.popen.pid), 1),
                "errors": sum(r.errors for r in runs[i]),
                "tool": result.tool,
                **extra,
            }
            self.rows.append(row)
            rows.append(row)
            print(
                f"  {section:<8} {label:<26} c={conns:<3} {row['rps']:>9.1f} req/s"
                f"  p50 {row['p50_ms']:>7.3f} ms  p99 {row['p99_ms']:>7.3f} ms"
                f"  cpu {row['cpu_ms_per_req']} ms/req  rss {row['rss_peak_mb']} MB"
                f"  err {row['errors']}",
                flush=True,
            )
        return rows

    def measure(
        self,
        section: str,
        label: str,
        proc: Proc,
        target: Target,
        conns: int,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        return self.measure_all(section, [(label, proc, target)], conns, seconds, **extra)[0]

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()

    # ------------------------------------------------------------ sections

    def relay_table(self) -> None:
        secs = self.args.seconds
        for delay in (0.0, 0.05) if not self.args.smoke else (0.0,):
            up = self.upstream(delay=delay)
            targets = [
                ("direct upstream", up, Target(up.port, "/v1/chat/completions", CHAT, AUTH)),
                ("bare relay simple", self.bare(up, "simple"), None),
                ("bare relay curl", self.bare(up, "curl"), None),
            ]
            gw_simple = self.gateway(up, "simple")
            gw_curl = self.gateway(up, "curl")
            targets += [
                (
                    "gateway call.php simple",
                    gw_simple,
                    Target(gw_simple.port, "/api/call.php", CHAT, AUTH),
                ),
                (
                    "gateway call.php curl",
                    gw_curl,
                    Target(gw_curl.port, "/api/call.php", CHAT, AUTH),
                ),
                (
                    "gateway /v1 curl",
                    gw_curl,
                    Target(gw_curl.port, "/v1/chat/completions", CHAT, AUTH),
                ),
            ]
            if self.args.baseline:
                # Another gateway.py (an earlier version), measured in the same rounds.
                base = self.gateway(up, "curl", script=self.args.baseline)
                targets.append(
                    ("baseline call.php curl", base, Target(base.port, "/api/call.php", CHAT, AUTH))
                )
            for conns in (1, 32) if not self.args.smoke else (8,):
                entries = [(lb, p, t or Target(p.port, "/", CHAT, AUTH)) for lb, p, t in targets]
                self.measure_all("relay", entries, conns, secs, delay_ms=int(delay * 1000))
            self.stop_all()

    def streaming(self) -> None:
        up = self.upstream(chunks=5)
        bare = self.bare(up, "simple")
        gw = self.gateway(up)
        conns = 32 if not self.args.smoke else 8
        entries = [
            ("bare relay stream", bare, Target(bare.port, "/stream", STREAM, AUTH)),
            ("gateway /v1 stream", gw, Target(gw.port, "/v1/chat/completions", STREAM, AUTH)),
        ]
        self.measure_all("stream", entries, conns, self.args.seconds)
        self.stop_all()

    def users_scaling(self) -> None:
        up = self.upstream()
        sizes = (10, 1000, 10000, 100000) if not self.args.smoke else (10, 1000)
        gateways = []
        for n in sizes:
            users = self.users_file(n)
            gw = self.gateway(up, users=users, extra=("--reload-interval=0.05",))
            gateways.append((n, users, gw, rss_mb(gw.popen.pid, "VmRSS")))
        entries = [
            (f"gateway {n} users", gw, Target(gw.port, "/api/call.php", CHAT, AUTH))
            for n, _, gw, _ in gateways
        ]
        rows = self.measure_all(
            "users", entries, 32 if not self.args.smoke else 8, self.args.seconds
        )
        for row, (n, users, gw, rss_start) in zip(rows, gateways, strict=True):
            # hot reload: add a user and time until their key works
            new_key = f"sk-new-{n}-0123456789"
            t0 = time.monotonic()
            users.write_text(users.read_text() + f"  newcomer: {{api_key: {new_key}}}\n")
            while time.monotonic() - t0 < 30:
                if asyncio.run(_one_call(gw.port, new_key)) == 200:
                    break
                time.sleep(0.01)
            row.update(
                users=n,
                startup_s=round(gw.ready_s, 3),
                rss_start_mb=round(rss_start, 1),
                reload_s=round(time.monotonic() - t0, 3),
            )
            print(
                f"    {n} users: start-up {row['startup_s']} s (RSS {row['rss_start_mb']} MB), "
                f"reload {row['reload_s']} s (the file is checked every 0.05 s here)",
                flush=True,
            )
        self.stop_all()

    def two_processes(self) -> None:
        up = self.upstream()
        data = Path(tempfile.mkdtemp(dir=self.tmp, prefix="shared-"))
        users = self.users_file(
            10, "  limited: {api_key: sk-limited-0123456789, daily_request_limit: 50}\n"
        )
        one = self.gateway(up, users=users, data=data)
        conns = 32 if not self.args.smoke else 8
        single = self.measure(
            "2procs",
            "one process",
            one,
            Target(one.port, "/api/call.php", CHAT, AUTH),
            conns,
            self.args.seconds,
        )
        two = self.gateway(up, users=users, data=data)
        results: list[Result] = []

        async def both() -> None:
            loop = asyncio.get_running_loop()
            futures = [
                loop.run_in_executor(
                    None,
                    run_load,
                    Target(p.port, "/api/call.php", CHAT, AUTH),
                    conns // 2,
                    self.args.seconds,
                    self.args.tool,
                )
                for p in (one, two)
            ]
            results.extend(await asyncio.gather(*futures))

        asyncio.run(both())
        rps = sum(r.rps for r in results)
        row = {
            "section": "2procs",
            "label": "two processes, one data dir",
            "conns": conns,
            "rps": round(rps, 1),
            "p50_ms": round(max(r.p50_ms for r in results), 3),
            "p99_ms": round(max(r.p99_ms for r in results), 3),
            "errors": sum(r.errors for r in results),
            "ratio_vs_one": round(rps / single["rps"], 2) if single["rps"] else None,
        }
        # limits still exact across the two: 200 calls at once, limit 50
        codes = asyncio.run(_burst([one.port, two.port], "sk-limited-0123456789", 200))
        row["limit_check"] = f"{codes.count(200)} of 200 succeeded with limit 50"
        row["limit_exact"] = codes.count(200) == 50
        self.rows.append(row)
        print(
            f"  2procs     two processes: {rps:.1f} req/s ({row['ratio_vs_one']}x one); {row['limit_check']}",
            flush=True,
        )
        self.stop_all()

    def open_streams(self) -> None:
        n = 2000 if not self.args.smoke else 100
        ramp, length = (2.0, 8.0) if not self.args.smoke else (0.5, 2.0)
        chunks = 16
        # The stream's length counts from its first byte: chunks x delay after the upstream starts.
        up = self.upstream(chunks=chunks, chunk_delay=length / chunks)
        gw = self.gateway(up, extra=(f"--concurrency={n + 100}",))
        target = Target(gw.port, "/v1/chat/completions", STREAM, AUTH)
        rss0 = rss_mb(gw.popen.pid, "VmRSS")
        done, steady, probes = asyncio.run(hold_streams(target, n, gw.port, ramp, length))
        row = {
            "section": "streams",
            "label": f"{n} open slow streams",
            "conns": n,
            "completed": done,
            "rss_before_mb": round(rss0, 1),
            "rss_peak_mb": round(rss_mb(gw.popen.pid), 1),
            "steady_p50_ms": round(percentile(steady, 0.5), 2),
            "steady_p99_ms": round(percentile(steady, 0.99), 2),
            "steady_probes": len(steady),
            "all_p99_ms": round(percentile(probes, 0.99), 2),
        }
        self.rows.append(row)
        print(
            f"  streams  {n} streams opened over {ramp}s, each ~{length}s: {done} completed; "
            f"RSS {row['rss_before_mb']} -> peak {row['rss_peak_mb']} MB; status latency with "
            f"all open p50 {row['steady_p50_ms']} ms p99 {row['steady_p99_ms']} ms "
            f"({len(steady)} probes), over the whole run p99 {row['all_p99_ms']} ms",
            flush=True,
        )
        self.stop_all()


async def _one_call(port: int, key: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = Target(
        port,
        "/api/call.php",
        CHAT,
        {"Content-Type": "application/json", "X-API-Key": key, "Connection": "close"},
    )
    writer.write(t.request())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def _burst(ports: list[int], key: str, n: int) -> list[int]:
    return list(await asyncio.gather(*(_one_call(ports[i % len(ports)], key) for i in range(n))))


# ---------------------------------------------------------------- report


def find(
    rows: list[dict[str, Any]], section: str, label: str, **match: Any
) -> dict[str, Any] | None:
    for r in rows:
        if (
            r["section"] == section
            and r["label"] == label
            and all(r.get(k) == v for k, v in match.items())
        ):
            return r
    return None


def ratios(rows: list[dict[str, Any]], smoke: bool) -> list[tuple[str, str, str]]:
    """(what, measured, target) for each target of the performance issue."""
    out = []
    conns = 8 if smoke else 32

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rps") -> float | None:
        return round(a[key] / b[key], 2) if a and b and b[key] else None

    for client in ("simple", "curl"):
        g = find(rows, "relay", f"gateway call.php {client}", conns=conns, delay_ms=0)
        b = find(rows, "relay", f"bare relay {client}", conns=conns, delay_ms=0)
        out.append(
            (
                f"gateway / bare relay throughput ({client} client, c={conns}, 0 ms)",
                f"{ratio(g, b)}x",
                ">= 0.7x",
            )
        )
    for delay_ms in (0, 50):
        g = find(rows, "relay", "gateway call.php curl", conns=conns, delay_ms=delay_ms)
        b = find(rows, "relay", "baseline call.php curl", conns=conns, delay_ms=delay_ms)
        if b:
            out.append(
                (
                    f"gateway / --baseline gateway throughput (curl, c={conns}, {delay_ms} ms)",
                    f"{ratio(g, b)}x",
                    ">= 0.95x (no slowdown)",
                )
            )
    g = find(rows, "stream", "gateway /v1 stream")
    b = find(rows, "stream", "bare relay stream")
    out.append(("gateway / bare relay streaming throughput", f"{ratio(g, b)}x", ">= 0.7x"))
    if not smoke:
        d = find(rows, "relay", "direct upstream", conns=1, delay_ms=0)
        for label in (
            "gateway call.php curl",
            "bare relay curl",
            "gateway call.php simple",
            "bare relay simple",
        ):
            g = find(rows, "relay", label, conns=1, delay_ms=0)
            if g and d:
                out.append(
                    (
                        f"added p50, idle connection: {label}",
                        f"{g['p50_ms'] - d['p50_ms']:.2f} ms",
                        "<= 1 ms (gateway)",
                    )
                )
    users = [r for r in rows if r["section"] == "users"]
    if users:
        small, big = users[0], users[-1]
        out.append(
            (
                f"throughput {big['users']} users / {small['users']} users",
                f"{ratio(big, small)}x",
                ">= 0.9x",
            )
        )
        ten_k = next((r for r in users if r["users"] == 10000), users[-1])
        out.append(
            (
                f"start-up / hot reload, {ten_k['users']} users",
                f"{ten_k['startup_s']} s / {ten_k['reload_s']} s",
                "< 1 s",
            )
        )
    two = find(rows, "2procs", "two processes, one data dir")
    if two:
        out.append(
            (
                "two processes / one, one data dir",
                f"{two['ratio_vs_one']}x ({two['limit_check']})",
                ">= 1.3x, exact",
            )
        )
    s = next((r for r in rows if r["section"] == "streams"), None)
    if s:
        out.append(
            (
                f"{s['conns']} open streams: peak RSS, loop lag p99 (status latency, all open)",
                f"{s['rss_peak_mb']} MB, {s['steady_p99_ms']} ms ({s['completed']} completed)",
                "<= 150 MB, <= 50 ms",
            )
        )
    return out


def report(bench: Bench, started: float) -> str:
    rows = bench.rows
    lines = [
        f"# Gateway benchmark ({'smoke' if bench.args.smoke else 'full'})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load by "
        f"{'wrk' if (bench.args.tool != 'python' and shutil.which('wrk')) else 'python'}; "
        f"every process on the same machine, loopback only.",
        "",
        "| section | what | conns | delay ms | req/s | p50 ms | p99 ms | CPU ms/req | peak RSS MB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "rps" in r and "cpu_ms_per_req" in r:
            lines.append(
                f"| {r['section']} | {r['label']} | {r['conns']} | {r.get('delay_ms', '')} | {r['rps']} | {r['p50_ms']} "
                f"| {r['p99_ms']} | {r['cpu_ms_per_req']} | {r['rss_peak_mb']} | {r['errors']} |"
            )
    lines += ["", "| target | measured | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in ratios(rows, bench.args.smoke)]
    users = [r for r in rows if r["section"] == "users"]
    if users:
        lines += [
            "",
            "| users | start-up s | reload s | RSS after start MB | peak RSS MB | req/s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['users']} | {r['startup_s']} | {r['reload_s']} | {r['rss_start_mb']} "
            f"| {r['rss_peak_mb']} | {r['rps']} |"
            for r in users
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds, tiny loads (for CI)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per run (3; smoke 1)")
    p.add_argument(
        "--tool", choices=["auto", "wrk", "python"], default="auto", help="load generator"
    )
    p.add_argument(
        "--repeat", type=int, default=None, help="runs per measurement, median kept (3; smoke 1)"
    )
    p.add_argument(
        "--only", default="", help="comma-separated sections: relay,stream,users,2procs,streams"
    )
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="directory for latest.md/.json"
    )
    p.add_argument(
        "--baseline",
        default="",
        help="another gateway.py (e.g. git show REV:gateway.py > /tmp/old.py) to measure "
        "side by side in the relay section",
    )
    args = p.parse_args()
    args.seconds = args.seconds or (1.0 if args.smoke else 3.0)
    args.repeat = args.repeat or (1 if args.smoke else 3)
    bench = Bench(args)
    started = time.time()
    sections = {
        "relay": bench.relay_table,
        "stream": bench.streaming,
        "users": bench.users_scaling,
        "2procs": bench.two_processes,
        "streams": bench.open_streams,
    }
    chosen = [s for s in args.only.split(",") if s] or list(sections)
    try:
        for name in chosen:
            print(f"== {name}", flush=True)
            sections[name]()
    finally:
        bench.stop_all()
    text = report(bench, started)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(json.dumps(bench.rows, indent=1))
    shutil.rmtree(bench.tmp, ignore_errors=True)
    failed = [r for r in bench.rows if r.get("errors")] + [
        r for r in bench.rows if r.get("limit_exact") is False
    ]
    if failed:
        print(f"FAILED: {len(failed)} measurements had errors or inexact limits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
