"""What routing costs: CPU per call with 10 upstreams and 100 keys, and latency added by failover.

    python bench/routing.py [--calls 2000]

1. In process, the Router's own work per call (route lookup, pick an upstream and a key,
   release, record the result) with 10 upstreams of 10 keys each, beside the same work for the
   single upstream the command line describes.
2. Two gateway processes side by side on one fast fake upstream: one with upstreams.yaml (10
   upstreams x 10 keys, all pointing at the fake), one with --upstream-base-url. The gateways'
   CPU seconds per call, measured over the same interleaved bursts.
3. Failover latency: a call whose first upstream refuses connections and whose second answers,
   beside a call straight to the second; the difference is what failover adds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run import KEY, Bench, _burst, _one_call, cpu_seconds, free_port

import gateway


def routing_yaml(port: int, upstreams: int = 10, keys: int = 10, first: str = "") -> str:
    lines = ["upstreams:"]
    if first:
        lines += [
            "  first:",
            f"    base_url: {first}",
            "    api_key: sk-first-0000000000",
            "    priority: 0",
        ]
    for u in range(upstreams):
        pool = ", ".join(f"sk-u{u}-k{k}-0123456789" for k in range(keys))
        lines += [
            f"  up{u}:",
            f"    base_url: http://127.0.0.1:{port}/v1",
            f"    api_keys: [{pool}]",
            f'    models: ["bench*", "gpt-4o-{u}*"]',
            f"    weight: {u + 1}",
            f"    priority: {1 if first else 0}",
        ]
    lines.append("cooldown_seconds: 0" if first else "retries: 2")
    return "\n".join(lines) + "\n"


def router_cost(spec: gateway.RoutingSpec, calls: int) -> float:
    """Microseconds of CPU per call for the Router's share of one call."""
    config = gateway.Config()
    router = gateway.Router(spec, config, gateway.Redactor())
    api = gateway.API_OPENAI
    t0 = time.process_time()
    for _ in range(calls):
        route = router.route("bench", api)
        assert route is not None
        picked = router.pick(route, set(), set())
        assert picked is not None
        channel, key = picked
        router.release(channel)
        router.succeeded(channel, key, 0.01)
    return (time.process_time() - t0) / calls * 1e6


def in_process(calls: int) -> list[str]:
    config = gateway.Config(upstream_api_key="sk-one")
    many = gateway.parse_routing(routing_yaml(9999), {}, config)
    one = gateway.default_routing(config)
    a = statistics.median(router_cost(many, calls) for _ in range(5))
    b = statistics.median(router_cost(one, calls) for _ in range(5))
    return [
        f"router, 10 upstreams x 10 keys: {a:.1f} us of CPU per call",
        f"router, one upstream (no file): {b:.1f} us of CPU per call",
        f"routing's own cost per call:    {a:.1f} us (target: at most 20 us)",
    ]


async def bursts(
    bench: Bench, plain: int, routed: int, pids: dict[int, int], calls: int
) -> dict[int, float]:
    cpu = dict.fromkeys((plain, routed), 0.0)
    for _ in range(5):
        for port in (plain, routed):
            c0 = cpu_seconds(pids[port])
            statuses = await _burst([port], KEY, calls // 5)
            assert set(statuses) == {200}, statuses
            cpu[port] += cpu_seconds(pids[port]) - c0
    return {p: c / calls * 1e6 for p, c in cpu.items()}


async def latency(port: int, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert await _one_call(port, KEY) == 200
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    out = in_process(max(args.calls * 10, 20000))
    bench = Bench(argparse.Namespace(repeat=1, tool="python", smoke=False))
    try:
        up = bench.upstream()
        routed_file = bench.tmp / "upstreams.yaml"
        routed_file.write_text(routing_yaml(up.port))
        plain = bench.gateway(up, client="curl")
        routed = bench.gateway(up, client="curl", extra=(f"--upstreams-file={routed_file}",))
        pids = {plain.port: plain.popen.pid, routed.port: routed.popen.pid}
        asyncio.run(_burst([plain.port, routed.port], KEY, 200))  # warm up
        cpu = asyncio.run(bursts(bench, plain.port, routed.port, pids, args.calls))
        out += [
            f"gateway CPU per call, one upstream:          {cpu[plain.port]:.0f} us",
            f"gateway CPU per call, 10 upstreams/100 keys: {cpu[routed.port]:.0f} us "
            f"(difference {cpu[routed.port] - cpu[plain.port]:+.0f} us; process CPU is "
            "measured in 10 ms ticks, so only the in-process figure resolves microseconds)",
        ]
        refused = f"http://127.0.0.1:{free_port()}/v1"
        failover_file = bench.tmp / "failover.yaml"
        failover_file.write_text(routing_yaml(up.port, upstreams=1, keys=1, first=refused))
        failover = bench.gateway(up, client="curl", extra=(f"--upstreams-file={failover_file}",))
        direct = asyncio.run(latency(plain.port, 50))
        over = asyncio.run(latency(failover.port, 50))
        out += [
            f"latency, straight to the upstream:             {direct:.2f} ms (median of 50)",
            f"latency, first upstream refuses, second answers: {over:.2f} ms "
            f"(failover adds {over - direct:.2f} ms; a connect timeout would add at most "
            "--upstream-connect-timeout, 10 s)",
        ]
    finally:
        bench.stop_all()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
