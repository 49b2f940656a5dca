"""Memory that request bodies can take: 8 MB uploads at once, with bad keys and with a good one.

    python bench/body_memory.py                  # against this checkout's gateway.py
    python bench/body_memory.py --gateway OTHER  # e.g. an older gateway.py, side by side

Starts a fake upstream and a gateway on 127.0.0.1, then sends --uploads concurrent uploads of
--mb megabytes: first to an unknown path and with an unknown key (nothing of them may be
buffered), then with a valid key (bounded by --max-body-memory, 64 MiB by default). Prints the
gateway's resident memory (VmRSS) before, and its peak (VmHWM) after each wave.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import KEY, Bench, rss_mb


async def upload(port: int, path: str, key: str, size: int) -> int:
    """One POST of `size` bytes (junk JSON); the status, or 0 if the server closed first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode())
    piece = b"[" + b" " * (1 << 20)
    sent = 0
    try:
        while sent < size:
            n = min(len(piece), size - sent)
            writer.write(piece[:n])
            await writer.drain()
            sent += n
        line = await asyncio.wait_for(reader.readline(), 60)
    except (ConnectionError, TimeoutError):
        line = b""
    writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 else 0


async def wave(port: int, path: str, key: str, n: int, size: int) -> dict[int, int]:
    codes: dict[int, int] = {}
    for code in await asyncio.gather(*(upload(port, path, key, size) for _ in range(n))):
        codes[code] = codes.get(code, 0) + 1
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--gateway", default="gateway.py", help="the gateway.py to measure")
    parser.add_argument("--extra", action="append", default=[], help="extra gateway options")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(smoke=True))
    try:
        upstream = bench.upstream()
        gw = bench.gateway(upstream, extra=tuple(args.extra))
        if args.gateway != "gateway.py":
            gw.popen.kill()
            bench.procs.remove(gw)
            argv = [a if a != "gateway.py" else args.gateway for a in gw.popen.args[1:]]
            argv = [a if not a.startswith("--port=") else "--port={port}" for a in argv]
            gw = bench.spawn("gateway-other", argv, {"UPSTREAM_API_KEY": "sk-bench-upstream"})
        time.sleep(0.5)
        pid, size = gw.popen.pid, int(args.mb * 1024 * 1024)
        start = rss_mb(pid, "VmRSS")
        print(f"gateway {args.gateway}: RSS at rest {start:.1f} MB")
        for label, path, key in (
            ("unknown path", "/nothing", KEY),
            ("unknown key", "/api/call.php", "sk-nobody-0000000000"),
            ("valid key", "/api/call.php", KEY),
        ):
            t0 = time.monotonic()
            codes = asyncio.run(wave(gw.port, path, key, args.uploads, size))
            peak = rss_mb(pid, "VmHWM")
            print(
                f"{args.uploads} x {args.mb:g} MB, {label:12}: answers {codes}, "
                f"{time.monotonic() - t0:.1f} s, peak RSS {peak:.1f} MB "
                f"(+{peak - start:.1f} MB over rest)"
            )
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
