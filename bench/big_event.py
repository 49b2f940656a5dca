"""One huge stream event from the upstream: how long the call takes and how long the gateway's
event loop stalls meanwhile.

    python bench/big_event.py                  # this checkout's gateway.py
    python bench/big_event.py --gateway OTHER  # e.g. an older gateway.py, side by side

A fake upstream on 127.0.0.1 answers every stream with two small events, then one event of
--mb megabytes (sent in 64 KiB pieces), then [DONE]. While a client streams through the gateway,
another polls GET /api/status.php every 5 ms: the slowest poll is the longest stall of the
gateway's event loop (plus one request's own time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import KEY, Bench, free_port


async def upstream(port: int, megabytes: float) -> asyncio.AbstractServer:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        )
        for word in ("Hel", "lo"):
            chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": word}}]}
            writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        writer.write(b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "')
        left, piece = int(megabytes * 1024 * 1024), b"X" * 65536
        try:
            while left > 0:
                writer.write(piece[: min(left, len(piece))])
                left -= len(piece)
                await writer.drain()
            writer.write(b'"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port)


async def measure(gw_port: int, up_port: int, megabytes: float) -> tuple[float, float, int, bool]:
    server = await upstream(up_port, megabytes)
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        f"{body}"
    ).encode()
    done = asyncio.Event()
    worst = 0.0

    async def poll() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", gw_port)
            writer.write(b"GET /api/status.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await reader.read()
            writer.close()
            worst = max(worst, time.monotonic() - t0)
            await asyncio.sleep(0.005)

    poller = asyncio.ensure_future(poll())
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw_port)
    writer.write(request)
    received, tail = 0, b""
    while chunk := await reader.read(1 << 20):
        received += len(chunk)
        tail = (tail + chunk)[-300:]
    elapsed = time.monotonic() - t0
    done.set()
    await poller
    writer.close()
    server.close()
    return elapsed, worst, received, b"stream_interrupted" in tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--gateway", default="gateway.py", help="the gateway.py to measure")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(smoke=True))
    up_port = free_port()
    try:
        gw = bench.spawn(
            "gateway",
            [
                args.gateway,
                "--port={port}",
                "--host=127.0.0.1",
                f"--users-file={bench.users_file(1)}",
                f"--data-dir={bench.tmp / 'data'}",
                f"--upstream-base-url=http://127.0.0.1:{up_port}/v1",
                "--logging=warning",
            ],
            {"UPSTREAM_API_KEY": "sk-bench-upstream"},
        )
        elapsed, worst, received, cut = asyncio.run(measure(gw.port, up_port, args.mb))
        print(
            f"{args.gateway}: one {args.mb:g} MB event: call {elapsed:.2f} s, "
            f"{received / 1024:.0f} KiB to the client"
            f"{' (ended with stream_interrupted)' if cut else ''}, "
            f"slowest status poll {worst * 1000:.0f} ms"
        )
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
