"""Fair share: how long one user's single call waits behind another user's flood.

    python bench/fair_share.py [--baseline OLD_gateway.py] [--delay 1.0]

Two workers (--concurrency=2), an upstream that takes --delay seconds per call. User A sends
40 calls at once; a moment later user B sends one. Prints when B's call was answered, in
upstream durations, for this checkout's gateway.py and, side by side, for --baseline (e.g.
the gateway before fair share, which served calls oldest first).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def measure(gw_mod: ModuleType, upstream_port: int, delay: float) -> tuple[float, int]:
    tmp = Path(tempfile.mkdtemp(prefix="gw-fair-"))
    (tmp / "users.yaml").write_text(
        "users:\n  a: {api_key: sk-user-a-000000}\n  b: {api_key: sk-user-b-000000}\n"
    )
    config = gw_mod.Config(
        port=0,
        users_file=str(tmp / "users.yaml"),
        data_dir=str(tmp / "data"),
        upstream_base_url=f"http://127.0.0.1:{upstream_port}/v1",
        upstream_api_key="sk-upstream-0000",
        concurrency=2,
        queue_size=64,
        upstream_timeout=600.0,
        http_client="simple",
    )
    if "user_queue_share" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, user_queue_share=1.0)  # A may fill the room
    gw = gw_mod.Gateway(config)
    sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
    await gw.start(sockets=[sock])
    http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=100)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    async def call(key: str) -> int:
        r = await http.fetch(
            f"http://127.0.0.1:{gw.port}/api/call.php",
            method="POST",
            body=body,
            headers={"X-API-Key": key},
            raise_error=False,
            request_timeout=600,
        )
        return r.code

    flood = [asyncio.ensure_future(call("sk-user-a-000000")) for _ in range(40)]
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    status = await call("sk-user-b-000000")
    waited = time.monotonic() - t0
    for f in flood:
        f.cancel()
    http.close()
    gw.service.stopping = True
    return waited / delay, status


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("tornado.access").setLevel(logging.ERROR)
    logging.getLogger("gateway").setLevel(logging.ERROR)

    class Slow(tornado.web.RequestHandler):
        async def post(self) -> None:
            await asyncio.sleep(args.delay)
            self.finish(
                {
                    "id": "x",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )

    sock, port = tornado.testing.bind_unused_port("127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/v1/.*", Slow)]))
    server.add_sockets([sock])
    rows = [("this gateway.py", load(ROOT / "gateway.py", "gateway_now"))]
    if args.baseline:
        rows.append((f"baseline {args.baseline}", load(Path(args.baseline), "gateway_base")))
    for label, module in rows:
        durations, status = await measure(module, port, args.delay)
        print(f"{label}: B's call answered {status} after {durations:.1f} upstream durations")
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="another gateway.py to measure side by side")
    parser.add_argument("--delay", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
