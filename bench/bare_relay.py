"""The baseline: a Tornado process that only relays (read body, fetch upstream, answer).

POST /  relays a JSON call; POST /stream relays an SSE stream chunk by chunk (flushing each).
No auth, no limits, no accounting: what the gateway is measured against.

    python bench/bare_relay.py --port 9103 --upstream http://127.0.0.1:9101/v1 [--client curl]
"""

from __future__ import annotations

import argparse
import asyncio

import tornado.httpclient
import tornado.web


class Relay(tornado.web.RequestHandler):
    async def post(self) -> None:
        client: tornado.httpclient.AsyncHTTPClient = self.settings["client"]
        response = await client.fetch(
            self.settings["upstream"] + "/chat/completions",
            method="POST",
            body=self.request.body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
        )
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)


class StreamRelay(tornado.web.RequestHandler):
    async def post(self) -> None:
        self.set_header("Content-Type", "text/event-stream")

        async def forward(chunk: bytes) -> None:
            self.write(chunk)
            await self.flush()

        await self.settings["stream_client"].fetch(
            self.settings["upstream"] + "/chat/completions",
            method="POST",
            body=self.request.body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
            streaming_callback=forward,
        )
        self.finish()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--client", choices=["simple", "curl"], default="simple")
    p.add_argument("--max-clients", type=int, default=2100)
    args = p.parse_args()
    import tornado.simple_httpclient

    simple = tornado.simple_httpclient.SimpleAsyncHTTPClient(
        force_instance=True, max_clients=args.max_clients
    )
    client = simple
    if args.client == "curl":
        from tornado.curl_httpclient import CurlAsyncHTTPClient

        client = CurlAsyncHTTPClient(force_instance=True, max_clients=args.max_clients)
    app = tornado.web.Application(
        [(r"/", Relay), (r"/stream", StreamRelay)],
        client=client,
        stream_client=simple,  # as in the gateway: streams use Tornado's own client
        upstream=args.upstream,
        log_function=lambda handler: None,
    )
    app.listen(args.port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
