"""Load generators: wrk when installed, else a keep-alive asyncio client; and a stream holder.

Every run is bounded in time and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    tool: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Target:
    port: int
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def request(self) -> bytes:
        head = [
            f"POST {self.path} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Content-Length: {len(self.body)}",
        ]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(target: Target, connections: int, seconds: float) -> Result:
    lua = "wrk.method = 'POST'\nwrk.body = %s\n" % json.dumps(target.body.decode())
    lua += "".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in target.headers.items()
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            f.name,
            f"http://127.0.0.1:{target.port}{target.path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    Path(f.name).unlink()
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    secs = _ms(re.search(r"requests in ([\d.]+\w+)", out).group(1)) / 1000  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(requests, secs, p50, p99, errors, "wrk")


# ---------------------------------------------------------------- asyncio fallback


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _python_load(target: Target, connections: int, seconds: float) -> Result:
    raw = target.request()
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                writer.write(raw)
                status = await _read_response(reader)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.monotonic() - start
    return Result(
        len(latencies),
        elapsed,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        errors,
        "python",
    )


def run_load(target: Target, connections: int, seconds: float, tool: str = "auto") -> Result:
    if tool == "wrk" or (tool == "auto" and shutil.which("wrk")):
        return run_wrk(target, connections, seconds)
    return asyncio.run(_python_load(target, connections, seconds))


# ---------------------------------------------------------------- many open streams


def _probe_process(port: int, seconds: float, out: Any) -> None:
    """In its own process (so the load generator's own loop cannot delay it): GET
    /api/status.php every 20 ms for `seconds`; send (start time, latency ms) pairs back."""
    samples = []
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            sock.sendall(b"GET /api/status.php HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            samples.append((t0, (time.monotonic() - t0) * 1000))
            time.sleep(0.02)
    out.send(samples)


async def hold_streams(
    target: Target, streams: int, probe_port: int, ramp: float, length: float
) -> tuple[int, list[float], list[float]]:
    """Open `streams` streaming calls spread evenly over `ramp` seconds, each lasting about
    `length` seconds, and read them to the end, while another process probes the gateway.

    Returns (streams completed with 200, probe latencies while every stream was open,
    all probe latencies) in ms.
    """
    raw = target.request()
    done = 0
    parent, child = multiprocessing.Pipe()
    probe = multiprocessing.Process(
        target=_probe_process, args=(probe_port, ramp + length + 1, child), daemon=True
    )
    probe.start()
    start = time.monotonic()

    async def one(delay: float) -> None:
        nonlocal done
        await asyncio.sleep(delay)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
            writer.write(raw)
            status = await asyncio.wait_for(_read_response(reader), ramp + length + 30)
            writer.close()
            if status == 200:
                done += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass

    await asyncio.gather(*(one(ramp * i / streams) for i in range(streams)))
    samples = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    probe.join(5)
    # "Every stream open": after the ramp, before the first stream can have ended.
    steady = [ms for t, ms in samples if start + ramp + 0.2 <= t <= start + length - 0.2]
    return done, steady, [ms for _, ms in samples]
