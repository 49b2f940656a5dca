"""What per-user policy costs: the policy checks per call with 100,000 users.

    python bench/policy.py [--users 100000] [--calls 200000]

In process, the work a call's policy adds on top of the key lookup: the expiry and address
checks, the model allowlist, and the store's pre-check of the per-minute, concurrency and token
limits, for users drawn at random from a users.yaml of --users users with every setting on,
beside the same calls for users with no policy (the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gateway


def users_yaml(n: int, policy: bool) -> str:
    lines = [
        "groups:",
        "  g: {models: ['gpt-4o*', 'deepseek-*'], rpm: 600, tpm: 1000000}",
        "users:",
    ]
    extra = (
        ", group: g, max_concurrency: 8, expires: 2099-12-31, allow_ips: [127.0.0.0/8, 10.0.0.0/8],"
        " token_policy: strict"
        if policy
        else ""
    )
    for i in range(n):
        lines.append(f"  u{i}: {{api_key: sk-bench-user-{i:08d}{extra}}}")
    return "\n".join(lines) + "\n"


async def cost(n: int, calls: int, policy: bool) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="gw-policy-"))
    (tmp / "users.yaml").write_text(users_yaml(n, policy))
    clock = gateway.DayClock(None, time.time)
    users = gateway.UserDirectory(str(tmp / "users.yaml"))
    users.load()
    store = gateway.JournalStore(str(tmp / "data"), clock)
    await store.start()
    config = gateway.Config(users_file=str(tmp / "users.yaml"), data_dir=str(tmp / "data"))
    service = gateway.Service(config, users, store, clock)
    keys = [f"sk-bench-user-{random.randrange(n):08d}" for _ in range(calls)]
    ledger = store._ledger(clock.today())
    now = int(time.time() * 1000)
    t0 = time.process_time()
    for key in keys:
        user = service.authenticate(key, "127.0.0.1")
        assert user.policy.allows_model("gpt-4o-mini")
        c = ledger.counter(user.name)
        assert store._refusal(ledger, user, c, now) is None
    spent = time.process_time() - t0
    await store.close()
    return spent / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    on, off = [], []
    for _ in range(3):
        on.append(asyncio.run(cost(args.users, args.calls, True)))
        off.append(asyncio.run(cost(args.users, args.calls, False)))
    a, b = statistics.median(on), statistics.median(off)
    print(
        f"{args.users} users, every policy setting on: {a:.1f} us of CPU per call (key lookup included)"
    )
    print(
        f"{args.users} users, no policy settings:       {b:.1f} us of CPU per call (key lookup included)"
    )
    print(
        f"what the policy checks add:                 {a - b:.1f} us per call (target: at most 20 us)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
