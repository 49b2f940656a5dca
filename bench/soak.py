"""Soak: mixed traffic against one gateway for a while; its memory must stay flat.

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 0.5   # a quick look

Traffic, all on 127.0.0.1: JSON calls on /api/call.php and /v1, streams, calls refused by the
daily limit (429), bad requests (400), unknown keys (401) and upstream failures (502). RSS is
sampled every few seconds; the run fails if it grows by more than --max-growth-mb after warm-up
(the first third of the run, at most 3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Target, _read_response
from run import AUTH, CHAT, STREAM, Bench, rss_mb

LIMITED = "sk-soak-limited-0123456789"


async def one(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(Target(port, path, body, {**headers, "Connection": "close"}).request())
    try:
        return await asyncio.wait_for(_read_response(reader), 30)
    finally:
        writer.close()


async def traffic(good: int, bad_upstream: int, seconds: float, codes: dict[int, int]) -> None:
    rng = random.Random(1)
    deadline = time.monotonic() + seconds
    mixes = [
        (good, "/api/call.php", CHAT, AUTH),
        (good, "/v1/chat/completions", CHAT, AUTH),
        (good, "/v1/chat/completions", STREAM, AUTH),
        (good, "/api/call.php", CHAT, {**AUTH, "X-API-Key": LIMITED}),  # 429 after 5
        (good, "/api/call.php", b"{not json", AUTH),  # 400
        (good, "/api/call.php", CHAT, {**AUTH, "X-API-Key": "sk-nobody-000000"}),  # 401
        (bad_upstream, "/api/call.php", CHAT, AUTH),  # 502
    ]

    async def worker() -> None:
        while time.monotonic() < deadline:
            port, path, body, headers = rng.choice(mixes)
            code = await one(port, path, body, headers)
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*(worker() for _ in range(16)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-growth-mb", type=float, default=20.0)
    p.add_argument("--client", choices=["auto", "curl", "simple"], default="auto")
    args = p.parse_args()
    bench = Bench(SimpleNamespace(smoke=True, tool="python", repeat=1, seconds=1.0))
    try:
        up = bench.upstream(chunks=5)
        users = bench.users_file(10, f"  limited: {{api_key: {LIMITED}, daily_request_limit: 5}}\n")
        gw = bench.gateway(up, client=args.client, users=users)
        # a second gateway whose upstream is a closed port: every admitted call is a 502
        data = Path(tempfile.mkdtemp(dir=bench.tmp))
        broken = bench.spawn(
            "gateway-broken",
            [
                "gateway.py",
                "--port={port}",
                "--host=127.0.0.1",
                f"--users-file={users}",
                f"--data-dir={data}",
                "--upstream-base-url=http://127.0.0.1:9/v1",
                "--logging=warning",
            ],
            env={"UPSTREAM_API_KEY": "sk-soak-upstream"},
        )
        total = args.minutes * 60
        # The allocator's high-water mark settles in the first minutes (measured: flat from
        # about 160 s on), so growth is judged after that.
        warmup = min(180.0, total / 3)
        codes: dict[int, int] = {}
        samples: list[tuple[float, float]] = []
        start = time.monotonic()

        async def sample() -> None:
            while time.monotonic() - start < total:
                samples.append((time.monotonic() - start, rss_mb(gw.popen.pid, "VmRSS")))
                await asyncio.sleep(min(10.0, total / 20))

        async def both() -> None:
            await asyncio.gather(traffic(gw.port, broken.port, total, codes), sample())

        asyncio.run(both())
        after_warmup = [rss for t, rss in samples if t >= warmup] or [samples[-1][1]]
        growth = after_warmup[-1] - after_warmup[0]
        print(json.dumps({"minutes": args.minutes, "codes": codes, "rss_mb": samples}, indent=None))
        print(
            f"RSS after warm-up {after_warmup[0]:.1f} MB -> end {after_warmup[-1]:.1f} MB "
            f"(growth {growth:+.1f} MB, limit {args.max_growth_mb} MB); answers: {codes}"
        )
        expected = {200, 400, 401, 429, 502}
        if not expected <= set(codes) or set(codes) - expected:
            print(f"FAILED: unexpected mix of answers {codes}", file=sys.stderr)
            return 1
        return 0 if growth <= args.max_growth_mb else 1
    finally:
        bench.stop_all()


if __name__ == "__main__":
    sys.exit(main())
