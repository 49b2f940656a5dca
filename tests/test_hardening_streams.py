"""Hardening regressions: streams are always charged, the team key and control characters stay
out of every output, lone surrogates and absurd usage figures are refused or estimated, and one
SSE event is bounded. Real servers on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.parse
from typing import Any

import pytest
import tornado.httpclient
from conftest import ALICE_KEY, UPSTREAM_KEY, Client, Env, data_text
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gateway

ADMIN_KEY = "admin-CANARY-0123456789"
HI = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- helpers


def port_of(client: Client) -> int:
    return int(client.base.rsplit(":", 1)[1])


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 POST, as bytes; the server closes the connection after answering."""
    head = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **(headers or {}),
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode() + body


async def raw_exchange(
    client: Client, data: bytes, *, stop_at: bytes | None = None, timeout: float = 10.0
) -> bytes:
    """Send raw bytes; read until the server closes (or `stop_at` arrives, then hang up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(client))
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        while stop_at is None or stop_at not in received:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            received += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return received


def parse_http(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and de-chunked body of a raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return status, headers, body


async def fetch(
    client: Client,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tornado.httpclient.HTTPResponse:
    resp = await client.http.fetch(
        client.base + path,
        method="GET" if body is None else "POST",
        body=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        raise_error=False,
        request_timeout=30,
        **kwargs,
    )
    assert resp.code != 599, resp.error
    return resp


def response_text(resp: tornado.httpclient.HTTPResponse) -> str:
    """A response's headers and body as one text, for secret scans."""
    head = "\n".join(f"{k}: {v}" for k, v in resp.headers.get_all())
    return head + "\n" + (resp.body or b"").decode("utf-8", "replace")


def log_texts(records: list[logging.LogRecord]) -> list[str]:
    """Every log record as it would be written: message plus any formatted traceback."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    out = []
    for r in records:
        out.append(r.getMessage())
        out.append(formatter.format(r))
        if r.exc_text:
            out.append(r.exc_text)
    return out


def call_lines(env: Env) -> list[dict[str, Any]]:
    day = env.gateways[0].clock.today()
    path = env.data_dir / "calls" / f"{day}.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x]


async def stats(client: Client) -> dict[str, Any]:
    return (await client.status())["stats"]  # type: ignore[no-any-return]


async def settled(env: Env, timeout: float = 5.0) -> None:
    """Wait until no call is between admission and its charge or release."""
    deadline = time.monotonic() + timeout
    while env.gateways[0].service.active:
        assert time.monotonic() < deadline, "a call never settled"
        await asyncio.sleep(0.01)


async def admin_state_text(client: Client, admin_key: str) -> str:
    """Log in to /admin with the admin key (XSRF cookie and field) and read the dashboard state."""
    cookies: dict[str, str] = {}

    async def request(
        path: str, method: str = "GET", body: str | None = None
    ) -> tornado.httpclient.HTTPResponse:
        headers = {}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        if method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp = await client.http.fetch(
            client.base + path,
            method=method,
            body=body,
            headers=headers,
            follow_redirects=False,
            raise_error=False,
        )
        for line in resp.headers.get_list("Set-Cookie"):
            name, value = line.split(";", 1)[0].split("=", 1)
            cookies[name] = value.strip('"')
        return resp

    page = await request("/admin")
    found = re.search(r'name="_xsrf" value="([^"]+)"', page.body.decode())
    assert found is not None, page.body[:300]
    form = urllib.parse.urlencode({"_xsrf": found.group(1), "key": admin_key})
    assert (await request("/admin/login", "POST", form)).code == 303
    state = await request("/admin/api/state")
    assert state.code == 200, state.body[:300]
    return state.body.decode("utf-8", "replace")


# ---------------------------------------------------------------- 1. a stream is never free


def nested(depth: int, inner: bytes = b'"deep"') -> bytes:
    return b"[" * depth + inner + b"]" * depth


DEEP_MESSAGES = {
    # Extra fields: one no estimator knows ("x") and one today's estimator walks ("text").
    "extra_fields": b'{"role":"user","content":"hi","x":'
    + nested(450)
    + b',"text":'
    + nested(450)
    + b"}",
    "content": b'{"role":"user","content":' + nested(450) + b"}",
}


@pytest.mark.parametrize("upstream_usage", ["sent_client_leaves_early", "none"])
@pytest.mark.parametrize("variant", sorted(DEEP_MESSAGES))
async def test_a_stream_with_a_450_deep_message_is_charged(
    env: Env, variant: str, upstream_usage: str
) -> None:
    """Streams whose message nests 450 deep are charged: with a limit of 2, 5 give 2 answers."""
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 2}})
    leave_early = upstream_usage != "none"
    if leave_early:
        # The client hangs up after the finish_reason chunk, before the usage chunk and [DONE].
        env.upstream.pieces = ["Hel", "lo"]
        env.upstream.stream_delay = 0.3
    else:
        env.upstream.usage = None  # the charge can only be an estimate
    client = await env.start()
    body = b'{"model":"m","stream":true,"messages":[' + DEEP_MESSAGES[variant] + b"]}"
    request = http_request("/v1/chat/completions", body, {"Authorization": f"Bearer {ALICE_KEY}"})
    answered = refused = 0
    for _ in range(5):
        env.upstream.client_left.clear()
        raw = await raw_exchange(
            client, request, stop_at=b'"finish_reason": "stop"' if leave_early else None
        )
        status = int(raw.split(b" ", 2)[1])
        if status == 200:
            assert b'"content": "Hel"' in raw
            answered += 1
        else:
            assert status == 429, raw[:500]
            refused += 1
        await settled(env)
    figures = await stats(client)
    assert (answered, refused, figures["today_requests"]) == (2, 3, 2)
    assert figures["today_tokens"] > 0


def _obj(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, JSON text) pairs."""
    return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{v}" for k, v in pairs) + "}"


def _arr(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _deepen(value: str, depth: int, how: str) -> str:
    """Wrap a JSON text `depth` levels deep without recursion (lists, content/text objects)."""
    opens = {"list": "[", "content": '{"content":', "text": '{"type":"text","text":'}
    closes = {"list": "]", "content": "}", "text": "}"}
    kinds = [how] * depth if how != "mixed" else ["list", "content", "text"] * (depth // 3)
    return "".join(opens[k] for k in kinds) + value + "".join(closes[k] for k in reversed(kinds))


_KEYS = st.one_of(
    st.sampled_from(["content", "text", "role", "type", "x", "usage", "messages", "input"]),
    st.text(max_size=8),
)
_HUGE = st.builds(
    lambda c, n: json.dumps(c * n, ensure_ascii=False),
    st.sampled_from(["a", "é", "中", "😀", " ", "\n"]),
    st.integers(0, 1_000_000),
)
_LEAVES = st.one_of(
    st.sampled_from(
        ["null", "true", "false", "0", "-1", "1e308", "123456789012345678901234567890"]
    ),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=40).map(lambda s: json.dumps(s, ensure_ascii=False)),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(_arr),
        st.lists(st.tuples(_KEYS, inner), max_size=4).map(_obj),
    ),
    max_leaves=8,
)
# Shallow, or deep: today's estimator overflows the stack from about 450 levels inside the
# server, but only from about 680 when called from a test, so the deep range reaches 1000.
_DEPTH = st.one_of(st.integers(0, 40), st.integers(400, 1000))
_DEEP = st.builds(_deepen, _VALUES, _DEPTH, st.sampled_from(["list", "content", "text", "mixed"]))
_MESSAGE = st.builds(
    lambda role, content, extra: _obj([("role", role), ("content", content), *extra]),
    st.sampled_from(['"user"', '"assistant"', "null", "1", '["user"]']),
    st.one_of(_DEEP, _HUGE),
    st.lists(st.tuples(_KEYS, _DEEP), max_size=2),
)
_MESSAGES = st.one_of(
    st.lists(_MESSAGE, min_size=1, max_size=3).map(_arr),
    st.lists(_MESSAGE, min_size=1, max_size=2).map(_arr),
    st.lists(st.one_of(_MESSAGE, _DEEP), min_size=1, max_size=3).map(_arr),
    _DEEP,
)
_REQUEST = st.builds(
    lambda model, messages, stream, extra: _obj(
        [("model", model), ("messages", messages), *stream, *extra]
    ),
    st.one_of(
        st.sampled_from(['"gpt-4o"', '"m"', '"模型"']),
        st.text(min_size=1, max_size=20).map(json.dumps),
        _VALUES,
    ),
    _MESSAGES,
    st.sampled_from([[], [("stream", "true")], [("stream", "false")], [("stream", '"yes"')]]),
    st.lists(
        st.tuples(st.one_of(st.sampled_from(["prompt", "input", "stream_options"]), _KEYS), _DEEP),
        max_size=2,
    ),
)
_FIGURE = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.integers(0, 200_000_000).map(str),
    st.sampled_from(
        [
            "9" * 4300,
            "-" + "9" * 4300,
            "15.0",
            "1e400",
            "NaN",
            "Infinity",
            "-Infinity",
            "true",
            "false",
            "null",
            '"15"',
            "[]",
            "{}",
            "[15]",
        ]
    ),
)
_USAGE = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "x"]), _FIGURE
        ),
        max_size=4,
    ).map(_obj),
    _FIGURE,
)
_CHOICE = st.lists(
    st.tuples(st.sampled_from(["index", "message", "text", "delta", "finish_reason"]), _DEEP),
    max_size=4,
).map(_obj)
_REPLY = st.lists(
    st.tuples(
        st.sampled_from(["usage", "choices", "id", "object"]),
        st.one_of(_USAGE, st.lists(st.one_of(_CHOICE, _DEEP), max_size=3).map(_arr), _DEEP),
    ),
    max_size=4,
).map(_obj)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def nesting(raw: bytes) -> int:
    """How deep a JSON text nests (strings skipped)."""
    depth = deepest = 0
    for char in _STRING.sub(b"", raw):
        if char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
    return deepest


def accepted(body: str) -> dict[str, Any] | None:
    """The request if parse_json_object and validate_chat_stream accept it; else None (a 400)."""
    raw = body.encode("utf-8", "surrogatepass")
    try:
        request = gateway.parse_json_object(raw)
        gateway.validate_chat_stream(request)
    except gateway.GatewayError as e:
        assert e.status == 400  # refused as the client's fault, and nothing else
        event("refused")
        return None
    event(f"accepted, nested {'>= 680' if nesting(raw) >= 680 else '< 680'} deep")
    return request


@settings(max_examples=200, deadline=None, database=None, report_multiple_bugs=False)
@given(body=_REQUEST, reply_text=_REPLY)
def test_usage_of_never_raises_for_an_accepted_body(body: str, reply_text: str) -> None:
    """For any accepted body and any reply, usage_of returns non-negative whole counts."""
    request = accepted(body)
    if request is None:
        return
    try:
        reply = json.loads(reply_text)
    except (ValueError, RecursionError):
        reply = {"usage": None}  # not a body the upstream client would hand over
    usage = gateway.usage_of(reply, request)
    assert isinstance(usage, gateway.Usage)
    for figure in (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens):
        assert isinstance(figure, int) and not isinstance(figure, bool)
        assert figure >= 0


@settings(max_examples=200, deadline=None, database=None, report_multiple_bugs=False)
@given(body=_REQUEST)
def test_estimate_request_tokens_never_raises_for_an_accepted_body(body: str) -> None:
    """For any body the validator accepts, estimate_request_tokens returns a count >= 0."""
    request = accepted(body)
    if request is None:
        return
    estimate = gateway.estimate_request_tokens(request)
    assert isinstance(estimate, int) and not isinstance(estimate, bool)
    assert estimate >= 0


# ---------------------------------------------------------------- 2. the team key never leaks


def upstream_echoes(env: Env, status: int, form: str, key: str, message: str) -> None:
    """Make the fake upstream answer `status`, echoing the key in the way `form` names."""
    up = env.upstream
    up.status, up.body, up.headers = status, None, {}
    if form == "json":
        error = {"message": message, "type": "invalid_request_error"}
        up.body = json.dumps({"error": error}).encode()
    elif form == "text":
        up.body = f"<html><body>{status} error: {message}</body></html>\n".encode()
        up.headers = {"Content-Type": "text/html"}
    else:
        up.headers = {
            "X-Debug": f"Bearer {key}",
            "WWW-Authenticate": f'Bearer realm="api", error_description="{message}"',
            "X-Upstream-Key": key,
        }


ROUTES = (
    ("/api/call.php", False),
    ("/v1/chat/completions", False),
    ("/v1/chat/completions", True),
)


async def call_every_route(client: Client, seen: list[str], model: str = "m") -> None:
    """One JSON call, one /v1 JSON call and one /v1 stream; each must fail (the upstream does)."""
    for path, stream in ROUTES:
        doc: dict[str, Any] = {"model": model, "messages": HI}
        if stream:
            doc["stream"] = True
        if path == "/api/call.php":
            headers = {"X-API-Key": ALICE_KEY}
        else:
            headers = {"Authorization": f"Bearer {ALICE_KEY}"}
        resp = await fetch(client, path, json.dumps(doc).encode(), headers)
        assert resp.code >= 400, (path, stream, resp.code)
        seen.append(response_text(resp))


async def gather_everything(env: Env, client: Client, seen: list[str], admin_key: str) -> None:
    """Add the status page, the dashboard state (over HTTP and directly) to `seen`."""
    seen.append(response_text(await fetch(client, "/api/status.php")))
    seen.append(await admin_state_text(client, admin_key))
    seen.append(json.dumps(await env.gateways[0].service.admin_state(), ensure_ascii=False))


async def test_upstream_key_echoed_by_the_upstream_never_leaks(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The team key echoed by an upstream 401/429/500 reaches no response, log, data/ or state."""
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        client = await env.start(admin_key=ADMIN_KEY)
        for status in (401, 429, 500):
            for form in ("json", "text", "headers"):
                message = f"Incorrect API key provided: Bearer {UPSTREAM_KEY} ({form})"
                upstream_echoes(env, status, form, UPSTREAM_KEY, message)
                await call_every_route(client, seen)
        await gather_everything(env, client, seen, ADMIN_KEY)
        await env.stop()
    assert len(env.upstream.requests) == 27  # every call reached the upstream
    logs = log_texts(caplog.records)
    assert any("/v1/chat/completions" in x for x in logs)  # the access log was captured
    stored = data_text(env.data_dir)
    assert "alice" in stored
    for where, text in (
        ("logs", "\n".join(logs)),
        ("data", stored),
        ("responses", "\n".join(seen)),
    ):
        assert UPSTREAM_KEY not in text, where


FRAGMENT_KEY = "gsk_CANARYabcdef0123456789xyz"
FRAGMENT_ADMIN_KEY = "admin-FRAGMENT-canary"  # shares no 8 characters with FRAGMENT_KEY


async def test_fragments_of_the_upstream_key_never_leak(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """No 8 consecutive characters of the team key, echoed as a prefix or suffix, leak anywhere."""
    seen: list[str] = []
    fragments = [FRAGMENT_KEY[i : i + 8] for i in range(len(FRAGMENT_KEY) - 7)]
    echoes = (
        f"Invalid API Key: {FRAGMENT_KEY[:12]}…",
        f"Incorrect API key provided: ****************{FRAGMENT_KEY[-8:]}",
    )
    with caplog.at_level(logging.DEBUG):
        client = await env.start(admin_key=FRAGMENT_ADMIN_KEY, upstream_api_key=FRAGMENT_KEY)
        for status in (401, 500):
            for form in ("json", "text", "headers"):
                for message in echoes:
                    upstream_echoes(env, status, form, FRAGMENT_KEY[-8:], message)
                    await call_every_route(client, seen)
        await gather_everything(env, client, seen, FRAGMENT_ADMIN_KEY)
        await env.stop()
    headers, _ = env.upstream.requests[-1]
    assert headers["Authorization"] == f"Bearer {FRAGMENT_KEY}"  # the key really is this one
    everywhere = {
        "logs": "\n".join(log_texts(caplog.records)),
        "data": data_text(env.data_dir),
        "responses": "\n".join(seen),
    }
    for where, text in everywhere.items():
        leaked = [f for f in fragments if f in text]
        assert not leaked, (where, leaked)


@pytest.mark.parametrize(
    "bad_value",
    [ALICE_KEY.encode() + b"\x01", ALICE_KEY.encode() + b"\rX"],
    ids=["control_char", "lone_cr"],
)
async def test_a_key_in_a_malformed_header_is_not_logged_and_gets_json_400(
    env: Env, caplog: pytest.LogCaptureFixture, bad_value: bytes
) -> None:
    """A key in a header Tornado refuses never reaches the log; the client gets a JSON 400."""
    with caplog.at_level(logging.DEBUG):
        client = await env.start()
        body = json.dumps({"model": "m", "messages": HI}).encode()
        request = (
            b"POST /api/call.php HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
            + bad_value
            + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        raw = await raw_exchange(client, request, timeout=5)
        await asyncio.sleep(0.1)  # anything logged after the answer is captured too
    for text in log_texts(caplog.records):
        assert ALICE_KEY not in text
    status, _, payload = parse_http(raw)
    assert status == 400
    assert ALICE_KEY.encode() not in raw
    doc = json.loads(payload)
    assert doc["success"] is False
    assert env.upstream.requests == []


# ---------------------------------------------------------------- 7. lone surrogates


SURROGATE_MODEL = b'{"model":"x\\ud800","messages":[{"role":"user","content":"hi"}]'
ROUTE_IDS = ["call", "v1", "v1_stream"]


async def post_route(client: Client, route: str, body: bytes) -> tornado.httpclient.HTTPResponse:
    if route == "call":
        return await fetch(client, "/api/call.php", body, {"X-API-Key": ALICE_KEY})
    return await fetch(
        client, "/v1/chat/completions", body, {"Authorization": f"Bearer {ALICE_KEY}"}
    )


def assert_bad_request_shape(route: str, resp: tornado.httpclient.HTTPResponse) -> None:
    assert resp.code == 400, (resp.code, resp.body[:300])
    doc = json.loads(resp.body)
    if route == "call":
        assert doc["success"] is False
        assert doc["message"] == "请求参数错误"
    else:
        assert isinstance(doc["error"], dict)
        assert doc["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", ROUTE_IDS)
async def test_a_lone_surrogate_in_the_model_is_a_400(env: Env, route: str) -> None:
    """A model name with a lone surrogate escape answers 400; nothing is sent on or charged."""
    client = await env.start()
    tail = b',"stream":true}' if route == "v1_stream" else b"}"
    resp = await post_route(client, route, SURROGATE_MODEL + tail)
    assert_bad_request_shape(route, resp)
    assert env.upstream.requests == []
    assert (await stats(client))["today_requests"] == 0


SURROGATE_SPOTS = {
    "content": b'{"model":"m","messages":[{"role":"user","content":"a\\udc00b"}]',
    "dict_key": b'{"model":"m","messages":[{"role":"user","content":"hi","\\ud83d":1}]',
    "deep_extra": b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":'
    + nested(40, b'{"y":["ok","\\udfff"]}'),
    "high_low_reversed": b'{"model":"m","messages":[{"role":"user","content":"\\ude00\\ud83d"}]',
}


@pytest.mark.parametrize("route", ROUTE_IDS)
@pytest.mark.parametrize("spot", sorted(SURROGATE_SPOTS))
async def test_a_lone_surrogate_anywhere_is_a_400(env: Env, spot: str, route: str) -> None:
    """A lone surrogate in content, a key or deep in an extra field is a 400, never a 500."""
    client = await env.start()
    tail = b',"stream":true}' if route == "v1_stream" else b"}"
    resp = await post_route(client, route, SURROGATE_SPOTS[spot] + tail)
    assert_bad_request_shape(route, resp)
    assert env.upstream.requests == []
    assert (await stats(client))["today_requests"] == 0


_CODE_POINTS = st.lists(
    st.one_of(st.integers(0xD800, 0xDFFF), st.integers(0, 0x10FFFF)).map(chr), max_size=6
).map("".join)


def _place(text: str, spot: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if spot == "model":
        doc["model"] = "gpt-" + text
    elif spot == "content":
        doc["messages"][0]["content"] = text
    elif spot == "content_part":
        doc["messages"][0]["content"] = [{"type": "text", "text": text}]
    elif spot == "role":
        doc["messages"][0]["role"] = text
    elif spot == "key":
        doc["messages"][0][text] = "v"
    elif spot == "top_key":
        doc[text or "k"] = 1
    else:
        value: Any = [text]
        for _ in range(30):
            value = {"y": value}
        doc["x"] = value
    return doc


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=_CODE_POINTS,
    spot=st.sampled_from(["model", "content", "content_part", "role", "key", "top_key", "deep"]),
    route=st.sampled_from(ROUTE_IDS),
    ascii_only=st.booleans(),
)
async def test_any_code_point_anywhere_is_a_200_or_a_400(
    env: Env, text: str, spot: str, route: str, ascii_only: bool
) -> None:
    """Any code points, surrogates included, anywhere in a chat body: 200 or 400, never 500."""
    if not env.gateways:
        env.write_users(
            {
                "alice": {
                    "api_key": ALICE_KEY,
                    "daily_request_limit": 10**6,
                    "daily_token_limit": 10**9,
                }
            }
        )
        await env.start()
    client = Client(f"http://127.0.0.1:{env.gateways[0].port}", env.http)
    doc = _place(text, spot)
    if route == "v1_stream":
        doc["stream"] = True
    body = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    before, sent = (await stats(client))["today_requests"], len(env.upstream.requests)
    resp = await post_route(client, route, body)
    assert resp.code in (200, 400), (resp.code, resp.body[:300])
    ok = resp.code == 200
    assert (await stats(client))["today_requests"] - before == int(ok)
    assert len(env.upstream.requests) - sent == int(ok)


# ---------------------------------------------------------------- 8. absurd usage figures


CHAT_REPLY = (
    b'{"id":"chatcmpl-odd","object":"chat.completion","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"pong"},"finish_reason":"stop"}],"usage":'
)
HUGE = b"9" * 4300  # the most digits Python will turn into an int by default
ODD_USAGE = {
    "4300_digit_total": b'{"total_tokens":' + HUGE + b"}",
    "4300_digit_all": b'{"prompt_tokens":%s,"completion_tokens":%s,"total_tokens":%s}'
    % (HUGE, HUGE, HUGE),
    "over_range": b'{"total_tokens":100000001}',
    "negative": b'{"prompt_tokens":-10,"completion_tokens":-5,"total_tokens":-15}',
    "float": b'{"prompt_tokens":10.0,"completion_tokens":5.0,"total_tokens":15.0}',
    "boolean": b'{"prompt_tokens":true,"completion_tokens":true,"total_tokens":true}',
    "string": b'{"prompt_tokens":"10","completion_tokens":"5","total_tokens":"15"}',
}
ODD_STREAM_USAGE: dict[str, Any] = {
    "4300_digit_total": {"total_tokens": int(HUGE)},
    "over_range": {"total_tokens": 100_000_001},
    "negative": {"prompt_tokens": -10, "completion_tokens": -5, "total_tokens": -15},
    "float": {"prompt_tokens": 10.0, "completion_tokens": 5.0, "total_tokens": 15.0},
    "boolean": {"prompt_tokens": True, "completion_tokens": True, "total_tokens": True},
    "string": {"prompt_tokens": "10", "completion_tokens": "5", "total_tokens": "15"},
}


async def test_absurd_upstream_usage_is_charged_as_an_estimate(env: Env) -> None:
    """Usage figures that are not integers in 0..100,000,000 are replaced by a small estimate."""
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1000}})
    client = await env.start(admin_key=ADMIN_KEY)
    calls = 0
    for _ in range(3):
        for name, usage in ODD_USAGE.items():
            env.upstream.body = CHAT_REPLY + usage + b"}"
            status, doc, _ = await client.call({"model": "m", "messages": HI})
            calls += 1
            assert status == 200, (name, doc)
            charged = doc["data"]["usage"]
            assert charged.get("estimated") is True, (name, charged)
            assert 0 < charged["total_tokens"] < 1000, (name, charged)
    env.upstream.body = None
    for name, usage in ODD_STREAM_USAGE.items():
        env.upstream.usage = usage
        resp = await fetch(
            client,
            "/v1/chat/completions",
            json.dumps({"model": "m", "messages": HI, "stream": True}).encode(),
            {"Authorization": f"Bearer {ALICE_KEY}"},
        )
        calls += 1
        assert resp.code == 200 and resp.body.endswith(b"data: [DONE]\n\n"), name
        line = call_lines(env)[-1]
        assert line["estimated"] is True, (name, line)
        assert 0 < line["total_tokens"] < 1000, (name, line)
    figures = await stats(client)
    assert figures["today_requests"] == calls
    assert 0 < figures["today_tokens"] < 1000 * calls
    metrics = await fetch(client, "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert metrics.code == 200, metrics.body[:300]
    assert b"gateway_" in metrics.body
    assert (await fetch(client, "/api/status.php")).code == 200


# ---------------------------------------------------------------- 10. control characters in logs


ANSI_MESSAGE = "boom \x1b[31mRED\x1b[0m\nFAKE 200 LINE\r\nFAKE 200 LINE again\r"
ANSI_MODEL = "gpt\x1b]0;title\x07-\x1b[2J\rFAKE 200 LINE"


@pytest.mark.parametrize("form", ["json", "text"])
async def test_logs_escape_control_characters(
    env: Env, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """Escape sequences and line breaks from the upstream or a model name never reach a log raw."""
    with caplog.at_level(logging.DEBUG):
        client = await env.start()
        env.upstream.status = 500
        if form == "json":
            env.upstream.body = json.dumps({"error": {"message": ANSI_MESSAGE}}).encode()
        else:
            env.upstream.body = ANSI_MESSAGE.encode()
            env.upstream.headers = {"Content-Type": "text/plain"}
        seen: list[str] = []
        await call_every_route(client, seen, model=ANSI_MODEL)
        await env.stop()
    assert len(env.upstream.requests) == 3
    texts = log_texts(caplog.records)
    assert any("/api/call.php" in x for x in texts)  # the access log was captured
    for text in texts:
        for char in ("\x1b", "\x07", "\r"):
            assert char not in text, (char, text)
    for line in caplog.text.split("\n"):
        assert not line.startswith("FAKE 200 LINE"), caplog.text


# ---------------------------------------------------------------- 13. one SSE event is bounded


async def stream_events(client: Client) -> tuple[int, list[str], float]:
    chunks: list[bytes] = []
    t0 = time.monotonic()
    resp = await fetch(
        client,
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": HI, "stream": True}).encode(),
        {"Authorization": f"Bearer {ALICE_KEY}"},
        streaming_callback=chunks.append,
    )
    elapsed = time.monotonic() - t0
    text = b"".join(chunks).decode("utf-8", "replace")
    return resp.code, [e for e in text.split("\n\n") if e.strip()], elapsed


async def assert_cut_at_the_big_event(env: Env, client: Client) -> None:
    status, events, elapsed = await stream_events(client)
    assert status == 200
    assert "X" * 1000 not in "".join(events)  # the oversized event never reaches the client
    assert elapsed < 5, elapsed
    assert len(events) == 3, [e[:200] for e in events]
    first, second, last = (json.loads(e.removeprefix("data: ")) for e in events)
    assert first["choices"][0]["delta"]["content"] == "Hel"
    assert second["choices"][0]["delta"]["content"] == "lo"
    assert last["error"]["code"] == "stream_interrupted"
    await settled(env)
    assert (await stats(client))["today_requests"] == 1
    line = call_lines(env)[-1]
    assert (line["status"], line["partial"], line["stream"]) == (200, True, True)


async def test_an_sse_event_over_max_event_size_interrupts_the_stream(env: Env) -> None:
    """An upstream event over max_event_size is not relayed: an interrupted, charged stream."""
    big = 100_000
    env.upstream.pieces = ["Hel", "lo", "X" * big, "never"]
    env.upstream.stream_delay = 0.05
    client = await env.start(max_event_size=65536)
    await assert_cut_at_the_big_event(env, client)


async def test_a_20_mb_sse_event_is_cut_at_the_default_bound_quickly(env: Env) -> None:
    """At the default bound (1 MiB), a 20 MB upstream event is cut off within 5 seconds."""
    big = 20 * 1024 * 1024
    env.upstream.pieces = ["Hel", "lo", "X" * big]
    env.upstream.stream_delay = 0.05
    client = await env.start()
    await assert_cut_at_the_big_event(env, client)


async def test_a_malformed_chunked_body_gets_a_json_400(env: Env) -> None:
    """A request body with an invalid chunk size is answered in JSON, not a bare 400."""
    client = await env.start()
    request = (
        b"POST /api/call.php HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
        + ALICE_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        + b"Connection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    )
    raw = await raw_exchange(client, request, timeout=5)
    assert raw, "no answer"
    status, _, payload = parse_http(raw)
    assert status == 400
    try:
        doc = json.loads(payload)
    except ValueError:
        pytest.fail(f"not a JSON answer: {raw[:300]!r}")
    assert doc["success"] is False
    assert env.upstream.requests == []
    assert (await stats(client))["today_requests"] == 0
