"""Browsers: with --cors-origins, pages of those origins may call the API routes (preflights,
readable answers and headers, errors included); other origins and the admin pages get nothing."""

from __future__ import annotations

import json

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from conftest import ALICE_KEY, Client, Env
from playwright.async_api import async_playwright
from test_admin_web import ADMIN_KEY, _chromium, launch_chromium

ORIGIN = "http://chat.example.org"
STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def fetch(client: Client, path: str, method: str = "GET", **headers: str):  # type: ignore[no-untyped-def]
    body = json.dumps(STREAM) if method == "POST" else None
    return await client.http.fetch(
        client.base + path,
        method=method,
        body=body,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        raise_error=False,
        allow_nonstandard_methods=True,
    )


async def test_without_cors_origins_no_page_may_call(senv: Env) -> None:
    """By default a preflight is a 405 and no answer names an allowed origin."""
    client = await senv.start()
    pre = await fetch(client, "/v1/chat/completions", "OPTIONS", Origin=ORIGIN)
    assert pre.code == 405
    resp = await fetch(client, "/v1/models", Origin=ORIGIN, Authorization=f"Bearer {ALICE_KEY}")
    assert resp.code == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/call.php", "/v1/models"])
async def test_a_preflight_from_an_allowed_origin(senv: Env, path: str) -> None:
    """A preflight from an allowed origin: 204, the methods, the headers it asked for."""
    client = await senv.start(cors_origins=f"{ORIGIN}, http://other.example")
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    pre = await fetch(
        client,
        path,
        "OPTIONS",
        Origin=ORIGIN,
        Access_Control_Request_Method="POST",
        Access_Control_Request_Headers=asked,
    )
    assert pre.code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == asked
    stranger = await fetch(client, path, "OPTIONS", Origin="http://evil.example")
    assert stranger.code == 405
    assert "Access-Control-Allow-Origin" not in stranger.headers


async def test_answers_and_errors_are_readable_by_an_allowed_page(senv: Env) -> None:
    """Answers, 401s and 429s carry the allowed origin and expose the rate-limit headers;
    the admin pages never carry CORS headers."""
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await senv.start(cors_origins=ORIGIN, admin_key=ADMIN_KEY)
    key = {"Origin": ORIGIN, "Authorization": f"Bearer {ALICE_KEY}"}
    for expected in (200, 429):
        resp = await fetch(client, "/v1/chat/completions", "POST", **key)
        assert resp.code == expected
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        exposed = resp.headers["Access-Control-Expose-Headers"].lower()
        assert "x-ratelimit-remaining-requests" in exposed and "retry-after" in exposed
    bad = await fetch(client, "/api/call.php", "POST", Origin=ORIGIN, X_API_Key="sk-wrong-000000")
    assert bad.code == 401 and bad.headers["Access-Control-Allow-Origin"] == ORIGIN
    for path in ("/admin", "/metrics", "/admin/api/state"):
        resp = await fetch(client, path, Origin=ORIGIN)
        assert "Access-Control-Allow-Origin" not in resp.headers, path
        pre = await fetch(client, path, "OPTIONS", Origin=ORIGIN)
        assert pre.code in (404, 405) and "Access-Control-Allow-Origin" not in pre.headers


PAGE = """<!doctype html><meta charset="utf-8"><title>chat</title><p>chat page</p>"""


class _Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


@pytest.mark.slow
async def test_a_page_of_another_origin_streams_a_reply_in_chromium(senv: Env) -> None:
    """In real Chromium, a page served from another origin streams a chat reply through
    fetch and reads x-ratelimit-remaining-requests."""
    chromium = _chromium()
    sock, port = tornado.testing.bind_unused_port("127.0.0.1")
    site = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", _Page)]))
    site.add_sockets([sock])
    origin = f"http://127.0.0.1:{port}"
    client = await senv.start(cors_origins=origin)
    script = """async ([url, key]) => {
        const r = await fetch(url, {method: "POST", headers: {
            "Authorization": "Bearer " + key, "Content-Type": "application/json"},
            body: JSON.stringify({model: "m", stream: true,
                                  messages: [{role: "user", content: "hi"}]})});
        const reader = r.body.getReader(); const dec = new TextDecoder(); let text = "";
        for (;;) { const {done, value} = await reader.read(); if (done) break;
                   text += dec.decode(value, {stream: true}); }
        return {status: r.status, remaining: r.headers.get("x-ratelimit-remaining-requests"),
                text: text};
    }"""
    try:
        async with async_playwright() as p:
            browser = await launch_chromium(p, chromium)
            try:
                page = await browser.new_page()
                await page.goto(origin + "/")
                got = await page.evaluate(script, [client.base + "/v1/chat/completions", ALICE_KEY])
            finally:
                await browser.close()
    finally:
        site.stop()
    assert got["status"] == 200
    assert got["remaining"] is not None and int(got["remaining"]) >= 0
    events = [e for e in got["text"].split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    content = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if json.loads(e[6:]).get("choices")
    )
    assert content == "Hello world"
