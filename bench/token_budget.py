"""How far each token policy lets a user past their daily token limit under concurrency.

    python bench/token_budget.py

A fake upstream answers every call with usage = 10 prompt tokens + the max_tokens it was sent
(a model that uses all it is allowed). Two cases, each for admit, reserve and strict, against
a fresh gateway and data dir:
  1. 20 calls of max_tokens 490 (500 tokens each) released at once, daily_token_limit 1,000;
  2. 200 calls with random max_tokens (1-2,000) released at once, daily_token_limit 20,000.
Prints tokens charged and the overshoot past the limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gateway

KEY = "sk-budget-0123456789"


class Upstream(tornado.web.RequestHandler):
    async def post(self) -> None:
        body = json.loads(self.request.body)
        completion = int(body.get("max_tokens") or 1000)
        await asyncio.sleep(0.05)
        self.finish(
            {
                "id": "x",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": completion,
                    "total_tokens": 10 + completion,
                },
            }
        )


async def run(policy: str, limit: int, max_tokens: list[int], port: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="gw-budget-"))
    (tmp / "users.yaml").write_text(
        f"users:\n  u: {{api_key: {KEY}, daily_request_limit: 100000, "
        f"daily_token_limit: {limit}, token_policy: {policy}}}\n"
    )
    config = gateway.Config(
        port=0,
        users_file=str(tmp / "users.yaml"),
        data_dir=str(tmp / "data"),
        upstream_base_url=f"http://127.0.0.1:{port}/v1",
        upstream_api_key="sk-upstream-0000",
        concurrency=256,
        queue_size=1024,
        http_client="simple",
    )
    gw = gateway.Gateway(config)
    sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
    await gw.start(sockets=[sock])
    http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=500)

    async def call(n: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": n}
        await http.fetch(
            f"http://127.0.0.1:{gw.port}/v1/chat/completions",
            method="POST",
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {KEY}"},
            raise_error=False,
        )

    await asyncio.gather(*(call(n) for n in max_tokens))
    assert gw.service is not None
    charged = gw.service.store.counts("u", gw.service.clock.today()).tokens
    http.close()
    await gw.stop()
    return charged


async def main() -> None:
    logging.getLogger("tornado.access").setLevel(logging.ERROR)
    logging.getLogger("gateway").setLevel(logging.ERROR)
    app = tornado.web.Application([(r"/v1/chat/completions", Upstream)])
    sock, port = tornado.testing.bind_unused_port("127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    rng = random.Random(7)
    cases = [
        ("20 x 500 tokens at once, limit 1,000", 1000, [490] * 20),
        (
            "200 random calls at once, limit 20,000",
            20000,
            [rng.randint(1, 2000) for _ in range(200)],
        ),
    ]
    print("| case | policy | tokens charged | overshoot |")
    print("|---|---|---|---|")
    for name, limit, sizes in cases:
        for policy in gateway.TOKEN_POLICIES:
            charged = await run(policy, limit, sizes, port)
            over = max(0, charged - limit)
            print(f"| {name} | {policy} | {charged:,} | {over:,} ({over / limit:.0%}) |")
    server.stop()


if __name__ == "__main__":
    asyncio.run(main())
