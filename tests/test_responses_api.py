"""POST /v1/responses: OpenAI's Responses API relayed with the users' keys, limits and stream
accounting, driven black-box over HTTP and with the official `openai` SDK.

A small fake upstream of our own (tests/fakes.py) serves /v1/responses (JSON and event streams,
cut or slowed on demand, errors that echo the key it was sent); the demo process answers the
real shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import hypothesis
import openai
import pytest
import tornado.httpclient
from conftest import ALICE_KEY, UPSTREAM_KEY, Client, Env, Proc, data_text, free_port
from fakes import RespFake, serve_responses, sse_events, stop_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

DEMO_KEY = "your-api-key-here"
CANARY = "sk-canary-RESPONSES-0123456789abcdef"
# {"model": "m", "input": "hello there"}: 11 ASCII characters -> 3 prompt tokens, estimated
PROMPT = "hello there"
PROMPT_ESTIMATE = 3


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def fake() -> AsyncIterator[RespFake]:
    f = serve_responses(RespFake())
    yield f
    await stop_server(f)


async def start(senv: Env, fake: RespFake, **overrides: Any) -> Client:
    return await senv.start(**{"upstream_base_url": fake.url, **overrides})


_SDKS: list[openai.AsyncOpenAI] = []


def sdk(client: Client, key: str = ALICE_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
    """An SDK client on the gateway (no retries unless asked), closed after the test."""
    kwargs.setdefault("max_retries", 0)
    ai = openai.AsyncOpenAI(base_url=client.base + "/v1", api_key=key, **kwargs)
    _SDKS.append(ai)
    return ai


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    while _SDKS:
        await _SDKS.pop().close()


async def totals(client: Client) -> tuple[int, int]:
    stats = (await client.status())["stats"]
    return stats["today_requests"], stats["today_tokens"]


def call_lines(senv: Env) -> list[dict[str, Any]]:
    day = senv.gateways[0].clock.today()
    path = senv.data_dir / "calls" / f"{day}.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x]


async def post(
    client: Client,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    on_chunk: Any = None,
) -> tornado.httpclient.HTTPResponse:
    """POST /v1/responses with alice's key as a Bearer token (unless headers say otherwise)."""
    h = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}
    h.update(headers or {})
    data = raw if raw is not None else json.dumps(body).encode()
    resp = await client.http.fetch(
        client.base + "/v1/responses",
        method="POST",
        body=data,
        headers=h,
        raise_error=False,
        request_timeout=30,
        streaming_callback=on_chunk,
    )
    assert resp.code != 599, resp.error
    return resp


async def open_stream(
    client: Client, body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request sent over a plain socket, so that the test can hang up when it likes."""
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE_KEY.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(data)
        + data
    )
    await writer.drain()
    return reader, writer


def assert_openai_error(body: bytes, type_: str, code: str, param: str | None = None) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    error = doc["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


STREAM_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def settled(senv: Env, count: int = 1) -> list[dict[str, Any]]:
    """The call log once it holds `count` lines."""
    for _ in range(150):
        lines = call_lines(senv)
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.02)
    raise AssertionError(f"call log has {call_lines(senv)}")


# ---------------------------------------------------------------- 1. JSON answers


async def test_sdk_create_relays_the_answer_with_the_team_key_and_charges_exact_usage(
    senv: Env, fake: RespFake
) -> None:
    client = await start(senv, fake)
    raw = await sdk(client).responses.with_raw_response.create(model="gpt-4o", input=PROMPT)
    response = raw.parse()
    assert response.output_text == "Hello world"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (12, 7)
    # limits after this call, in the OpenAI headers
    assert raw.headers["x-ratelimit-limit-requests"] == "20"
    assert raw.headers["x-ratelimit-remaining-requests"] == "19"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(100000 - 19)
    # the upstream got the team's key, never alice's, at /v1/responses, with her body as sent
    assert len(fake.requests) == 1
    headers, body = fake.requests[0]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ALICE_KEY not in json.dumps(headers) and ALICE_KEY.encode() not in body
    assert json.loads(body) == {"model": "gpt-4o", "input": PROMPT}
    assert await totals(client) == (1, 19)
    line = (await settled(senv))[-1]
    assert (line["endpoint"], line["model"], line["status"], line["stream"]) == (
        "/v1/responses",
        "gpt-4o",
        200,
        False,
    )
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (12, 7, 19)
    assert (line["estimated"], line["partial"]) == (False, False)
    assert line["upstream_request_id"] == "resp_fake0123"


async def test_the_json_body_is_relayed_byte_for_byte(senv: Env, fake: RespFake) -> None:
    fake.raw_body = (
        b'{ "id" : "resp_odd",  "object":"response","status":"completed",\n'
        b'"output":[{"type":"message","id":"m1","status":"completed","role":"assistant",'
        b'"content":[{"type":"output_text","text":"caf\\u00e9 \xe2\x9c\x93","annotations":[]}]}],'
        b' "usage" : {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7} }\n'
    )
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT})
    assert resp.code == 200
    assert resp.body == fake.raw_body
    assert await totals(client) == (1, 7)


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": f"Bearer {ALICE_KEY}"},
        {"Authorization": "", "X-API-Key": ALICE_KEY},
        {"Authorization": "", "api-key": ALICE_KEY},
    ],
    ids=["bearer", "x-api-key", "azure-api-key"],
)
async def test_each_key_header_is_accepted(
    senv: Env, fake: RespFake, header: dict[str, str]
) -> None:
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT}, headers=header)
    assert resp.code == 200, resp.body
    assert fake.requests[0][0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert await totals(client) == (1, 19)


async def test_a_wrong_key_is_a_401_and_nothing_goes_upstream(senv: Env, fake: RespFake) -> None:
    client = await start(senv, fake)
    with pytest.raises(openai.AuthenticationError) as refused:
        await sdk(client, key="sk-nobody-0000000000").responses.create(model="m", input="x")
    assert refused.value.status_code == 401
    resp = await post(client, {"model": "m"}, headers={"Authorization": ""})
    assert_openai_error(resp.body, "authentication_error", "invalid_api_key")
    assert fake.requests == []
    assert await totals(client) == (0, 0)


async def test_without_usage_the_charge_is_estimated(senv: Env, fake: RespFake) -> None:
    fake.usage = None
    fake.pieces = ["pong"]
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT})
    assert resp.code == 200
    assert "usage" not in json.loads(resp.body)
    # prompt: "hello there" -> 3; output text "pong" -> 1
    assert await totals(client) == (1, PROMPT_ESTIMATE + 1)
    line = (await settled(senv))[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (PROMPT_ESTIMATE, 1)
    assert (line["estimated"], line["partial"]) == (True, False)


async def test_a_request_without_input_is_relayed(senv: Env, fake: RespFake) -> None:
    """`input` is optional in the Responses API (previous_response_id, prompt templates)."""
    client = await start(senv, fake)
    body = {"model": "m", "previous_response_id": "resp_123"}
    resp = await post(client, body)
    assert resp.code == 200, resp.body
    assert json.loads(fake.requests[0][1]) == body
    assert await totals(client) == (1, 19)


# ---------------------------------------------------------------- 2. streams


async def test_sdk_raw_stream_gets_every_event_and_the_closing_one_after_the_charge(
    senv: Env, fake: RespFake
) -> None:
    """The SDK reads every event in order; when it reads `response.completed`, the call is
    already charged (the raw-HTTP test below shows that event is held back for this)."""
    fake.linger = 0.5
    client = await start(senv, fake)
    stream = await sdk(client).responses.create(model="m", input=PROMPT, stream=True)
    kinds: list[str] = []
    seen_at_close = None
    final = None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            seen_at_close = await totals(client)
            final = event.response
    assert kinds == STREAM_TYPES
    assert seen_at_close == (1, 19)
    assert fake.finished
    assert final is not None and final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 7)
    assert final.output_text == "Hello world"
    # no stream_options injected for this API: the upstream got the client's own body
    assert json.loads(fake.requests[0][1]) == {"model": "m", "input": PROMPT, "stream": True}
    line = (await settled(senv))[-1]
    assert (line["stream"], line["total_tokens"], line["estimated"]) == (True, 19, False)


async def test_sdk_stream_helper_returns_the_final_response(senv: Env, fake: RespFake) -> None:
    client = await start(senv, fake)
    deltas = []
    async with sdk(client).responses.stream(model="m", input=PROMPT) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas == ["Hel", "lo", " wor", "ld"]
    assert final.output_text == "Hello world"
    assert final.usage is not None and final.usage.total_tokens == 19
    assert await totals(client) == (1, 19)


async def test_raw_stream_closing_event_is_last_and_sent_after_the_charge(
    senv: Env, fake: RespFake
) -> None:
    """`response.completed` is held back until the upstream's stream has ended and the charge
    is on disk: the upstream lingers 0.5 s after sending it, so a relay that forwarded it at
    once would let the client read it while the status still showed nothing charged."""
    fake.linger = 0.5
    fake.event_delay = 0.01
    client = await start(senv, fake)
    chunks: list[bytes] = []
    charged_when_closed: list[tuple[int, int]] = []

    async def on_chunk(chunk: bytes) -> None:
        chunks.append(chunk)
        if b"response.completed" in chunk:
            charged_when_closed.append(await totals(client))

    body = {"model": "m", "input": PROMPT, "stream": True}
    resp = await post(client, body, on_chunk=on_chunk)
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["x-ratelimit-limit-requests"] == "20"
    assert resp.headers["x-ratelimit-remaining-requests"] == "19"  # her slot is held
    assert charged_when_closed == [(1, 19)]
    events = sse_events(b"".join(chunks))
    assert [name for name, _ in events] == STREAM_TYPES
    assert [data["type"] for _, data in events] == STREAM_TYPES
    assert events[-1][1]["response"]["usage"]["total_tokens"] == 19
    assert b"".join(chunks).endswith(b"\n\n")


@pytest.mark.parametrize("closing", ["response.incomplete", "response.failed"])
async def test_incomplete_and_failed_close_a_stream_with_their_usage(
    senv: Env, fake: RespFake, closing: str
) -> None:
    """The stream's closing event may also be response.incomplete or response.failed: it is
    passed on last and its usage is charged (no error event, not estimated)."""
    fake.rewrite = lambda events: [
        *events[:-1],
        events[-1].replace(b"response.completed", closing.encode()),
    ]
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    events = sse_events(resp.body)
    assert [name for name, _ in events] == [*STREAM_TYPES[:-1], closing]
    assert await totals(client) == (1, 19)
    line = (await settled(senv))[-1]
    assert (line["estimated"], line["partial"], line["error"]) == (False, False, None)


# ---------------------------------------------------------------- 3. broken streams


async def test_a_stream_cut_by_the_upstream_ends_in_an_error_event_and_is_charged(
    senv: Env, fake: RespFake
) -> None:
    fake.cut_after = 6  # created, in_progress, item added, part added, "Hel", "lo"
    fake.event_delay = 0.05  # the events before the cut reach the gateway first
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    assert resp.code == 200
    events = sse_events(resp.body)
    assert [name for name, _ in events] == [*STREAM_TYPES[:6], "error"]
    error = events[-1][1]
    assert (error["type"], error["code"]) == ("error", "stream_interrupted")
    assert isinstance(error["message"], str) and error["message"]
    # never free: prompt estimate (3) + "Hello"[:5] seen in deltas -> ceil(5/4) = 2
    assert await totals(client) == (1, PROMPT_ESTIMATE + 2)
    line = (await settled(senv))[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (PROMPT_ESTIMATE, 2)
    assert (line["estimated"], line["partial"], line["status"]) == (True, True, 200)
    assert line["error"].startswith("stream_interrupted")


async def test_the_sdk_sees_the_interruption(senv: Env, fake: RespFake) -> None:
    fake.cut_after = 6
    fake.event_delay = 0.05
    client = await start(senv, fake)
    kinds = []
    async with sdk(client).responses.stream(model="m", input=PROMPT) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "error":
                assert event.code == "stream_interrupted"
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()
    assert kinds[-1] == "error"
    assert "response.completed" not in kinds
    requests, tokens = await totals(client)
    assert requests == 1 and tokens > 0


async def test_a_client_that_leaves_mid_stream_is_charged_an_estimate(
    senv: Env, fake: RespFake
) -> None:
    fake.pieces = ["word "] * 40
    fake.event_delay = 0.05
    client = await start(senv, fake)
    reader, writer = await open_stream(client, {"model": "m", "input": PROMPT, "stream": True})
    received = b""
    while received.count(b"response.output_text.delta") < 6:  # 3 events: name + type each
        received += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await asyncio.wait_for(fake.left.wait(), 3)  # the upstream call was cancelled
    assert not fake.finished
    line = (await settled(senv))[-1]
    assert (line["status"], line["partial"], line["estimated"]) == (499, True, True)
    assert line["prompt_tokens"] == PROMPT_ESTIMATE
    assert 2 <= line["completion_tokens"] < 50  # "word " x (3..) -> far below the whole answer
    assert await totals(client) == (1, line["total_tokens"])


async def test_a_client_that_leaves_while_queued_is_not_charged(senv: Env, fake: RespFake) -> None:
    fake.event_delay = 0.1  # the first stream holds the only worker for about 1.2 s
    client = await start(senv, fake, concurrency=1)
    first = asyncio.ensure_future(post(client, {"model": "m", "input": PROMPT, "stream": True}))
    await asyncio.sleep(0.2)
    assert len(fake.requests) == 1
    _, writer = await open_stream(client, {"model": "m", "input": "second", "stream": True})
    await asyncio.sleep(0.2)  # queued behind the first
    writer.close()
    assert (await first).code == 200
    await asyncio.sleep(0.3)  # the worker takes the queued call, finds its client gone
    assert len(fake.requests) == 1
    assert await totals(client) == (1, 19)


async def test_a_stream_that_completes_without_usage_is_estimated(
    senv: Env, fake: RespFake
) -> None:
    fake.usage = None
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    assert [name for name, _ in sse_events(resp.body)] == STREAM_TYPES
    # prompt "hello there" -> 3; deltas "Hello world" (11 ASCII characters) -> 3
    assert await totals(client) == (1, PROMPT_ESTIMATE + 3)
    line = (await settled(senv))[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (PROMPT_ESTIMATE, 3)
    assert (line["estimated"], line["partial"], line["error"]) == (True, False, None)


# BUG: once the upstream has sent `response.completed` (the answer is whole and its usage
# known), a transport error after it, before the body's end (the connection dropped, or the
# upstream leaves it open past --upstream-timeout), makes SSERelay.finish (gateway.py:3111,
# `if error is None and not self.cut and (self.done or self.finished)`) discard the held-back
# closing event and send `event: error` / stream_interrupted instead: the client never gets
# `response.completed` (the SDK's get_final_response() raises), although the call is charged
# its exact usage; the call log marks it partial and interrupted.
@pytest.mark.parametrize("after", ["dropped", "stalled"])
async def test_a_break_after_the_closing_event_still_delivers_it(
    senv: Env, fake: RespFake, after: str
) -> None:
    fake.event_delay = 0.02  # every event reaches the gateway before the break
    if after == "dropped":
        fake.cut_after = len(STREAM_TYPES)
    else:
        fake.linger = 3.0  # longer than the upstream timeout below
    client = await start(senv, fake, upstream_timeout=1.0)
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    assert resp.code == 200
    assert await totals(client) == (1, 19)  # exact usage, from response.completed
    assert [name for name, _ in sse_events(resp.body)] == STREAM_TYPES


# ---------------------------------------------------------------- 4. limits under concurrency


async def test_ten_concurrent_streams_against_a_limit_of_three(senv: Env, fake: RespFake) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 3}})
    fake.event_delay = 0.02
    client = await start(senv, fake)
    body = {"model": "m", "input": PROMPT, "stream": True}
    results = await asyncio.gather(*(post(client, body) for _ in range(10)))
    codes = sorted(r.code for r in results)
    assert codes == [200] * 3 + [429] * 7
    for r in results:
        if r.code == 429:
            assert_openai_error(r.body, "rate_limit_error", "daily_request_limit_exceeded")
            assert r.headers["x-should-retry"] == "false"
            assert int(r.headers["Retry-After"]) > 0
        else:
            assert [name for name, _ in sse_events(r.body)] == STREAM_TYPES
    assert len(fake.requests) == 3
    assert await totals(client) == (3, 3 * 19)


async def test_the_sdk_gets_rate_limit_error_at_once_at_default_retries(
    senv: Env, fake: RespFake
) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await start(senv, fake)
    ai = sdk(client, max_retries=openai.DEFAULT_MAX_RETRIES)  # the SDK's default: 2 retries
    assert ai.max_retries == 2
    await ai.responses.create(model="m", input=PROMPT)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as limited:
        await ai.responses.create(model="m", input=PROMPT)
    assert time.monotonic() - t0 < 2
    headers = limited.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.value.body["code"] == "daily_request_limit_exceeded"  # type: ignore[index]
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        async with ai.responses.stream(model="m", input=PROMPT) as stream:
            await stream.get_final_response()
    assert time.monotonic() - t0 < 2
    assert len(fake.requests) == 1
    assert await totals(client) == (1, 19)


async def test_the_daily_token_limit_applies(senv: Env, fake: RespFake) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_token_limit": 30}})
    client = await start(senv, fake)
    assert (await post(client, {"model": "m", "input": PROMPT})).code == 200
    assert (await post(client, {"model": "m", "input": PROMPT})).code == 200  # 19 < 30
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})  # 38 >= 30
    assert resp.code == 429
    assert_openai_error(resp.body, "rate_limit_error", "daily_token_limit_exceeded")
    assert len(fake.requests) == 2
    assert await totals(client) == (2, 38)


# ---------------------------------------------------------------- 5. validation


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"just a string"', None),
        (b"", None),
        (b'{"model": "m", "input": NaN}', None),
        (json.dumps({"input": "hi"}).encode(), "model"),
        (json.dumps({"model": 5, "input": "hi"}).encode(), "model"),
        (json.dumps({"model": "  ", "input": "hi"}).encode(), "model"),
        (json.dumps({"model": "m", "input": 5}).encode(), "input"),
        (json.dumps({"model": "m", "input": {"role": "user"}}).encode(), "input"),
        (json.dumps({"model": "m", "input": None}).encode(), "input"),
        (json.dumps({"model": "m", "input": "hi", "stream": "yes"}).encode(), "stream"),
        (json.dumps({"model": "m", "input": "hi", "stream": 1}).encode(), "stream"),
        (json.dumps({"model": "m", "input": "hi", "stream": None}).encode(), "stream"),
    ],
)
async def test_invalid_bodies_are_400_and_cost_nothing(
    senv: Env, fake: RespFake, raw: bytes, param: str | None
) -> None:
    client = await start(senv, fake)
    resp = await post(client, raw=raw)
    assert resp.code == 400
    assert_openai_error(resp.body, "invalid_request_error", "invalid_request", param)
    assert fake.requests == []
    assert await totals(client) == (0, 0)


async def test_the_sdk_gets_bad_request_error(senv: Env, fake: RespFake) -> None:
    client = await start(senv, fake)
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk(client).responses.create(model="m", input=5)  # type: ignore[arg-type]
    assert bad.value.body["param"] == "input"  # type: ignore[index]
    assert fake.requests == []
    assert await totals(client) == (0, 0)


# ---------------------------------------------------------------- 6. upstream failures


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_500_is_a_502_and_costs_nothing(
    senv: Env, fake: RespFake, stream: bool
) -> None:
    fake.status = 500
    client = await start(senv, fake)
    body: dict[str, Any] = {"model": "m", "input": PROMPT}
    if stream:
        body["stream"] = True
    resp = await post(client, body)
    assert resp.code == 502
    assert resp.headers["Content-Type"].startswith("application/json")
    assert_openai_error(resp.body, "upstream_error", "upstream_error")
    assert len(fake.requests) == 1
    with pytest.raises(openai.InternalServerError) as failed:
        await sdk(client).responses.create(model="m", input=PROMPT, stream=stream)
    assert failed.value.status_code == 502
    assert await totals(client) == (0, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_refused_upstream_port_is_a_502_and_costs_nothing(senv: Env, stream: bool) -> None:
    client = await senv.start(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1")
    body: dict[str, Any] = {"model": "m", "input": PROMPT, "stream": stream}
    resp = await post(client, body)
    assert resp.code == 502
    assert_openai_error(resp.body, "upstream_error", "upstream_error")
    assert await totals(client) == (0, 0)


async def test_a_stream_answered_without_an_event_stream_is_a_502(
    senv: Env, fake: RespFake
) -> None:
    fake.content_type = "application/json"
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    assert resp.code == 502
    assert_openai_error(resp.body, "upstream_error", "upstream_error")
    assert await totals(client) == (0, 0)


async def test_a_json_call_answered_with_no_json_object_is_a_502(senv: Env, fake: RespFake) -> None:
    fake.raw_body = b"<html>bad gateway</html>"
    client = await start(senv, fake)
    resp = await post(client, {"model": "m", "input": PROMPT})
    assert resp.code == 502
    assert_openai_error(resp.body, "upstream_error", "upstream_error")
    assert await totals(client) == (0, 0)


# ---------------------------------------------------------------- 7. the upstream key stays put


async def test_an_echoed_upstream_key_appears_nowhere(
    senv: Env, fake: RespFake, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []

    def keep(resp: tornado.httpclient.HTTPResponse) -> tornado.httpclient.HTTPResponse:
        seen.append(resp.body + json.dumps(dict(resp.headers.get_all())).encode())
        return resp

    with caplog.at_level(logging.DEBUG):
        client = await start(senv, fake, upstream_api_key=CANARY)
        json_call = {"model": "m", "input": PROMPT}
        stream_call = {**json_call, "stream": True}
        # errors that echo the key
        fake.status, fake.echo_auth = 401, True
        for body in (json_call, stream_call):
            resp = keep(await post(client, body))
            assert resp.code == 502
            assert "[redacted]" in json.loads(resp.body)["error"]["message"]
        # answers and stream events that echo it
        fake.status = 200
        resp = keep(await post(client, json_call))
        assert resp.code == 200
        assert json.loads(resp.body)["output"][0]["content"][0]["text"] == (
            "Your key is Bearer [redacted] ok"
        )
        resp = keep(await post(client, stream_call))
        assert resp.code == 200
        events = sse_events(resp.body)
        assert events[-1][0] == "response.completed"
        deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
        assert deltas == "Your key is Bearer [redacted] ok"
        # a stream that breaks after echoing it
        fake.cut_after = 7
        fake.event_delay = 0.02
        resp = keep(await post(client, stream_call))
        assert sse_events(resp.body)[-1][0] == "error"
        fake.cut_after = None
        # through the SDK too
        fake.status = 401
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk(client).responses.create(model="m", input=PROMPT)
        seen.append(json.dumps(failed.value.body).encode())
        seen.append(json.dumps(await client.status()).encode())
        await senv.stop()
    assert all(h["Authorization"] == f"Bearer {CANARY}" for h, _ in fake.requests)
    assert len(fake.requests) == 6
    logs = "\n".join(
        r.getMessage() + (r.exc_text or "") + str(r.exc_info or "") for r in caplog.records
    )
    assert "POST /v1/responses" in logs  # the access log was captured
    failures = [r.getMessage() for r in caplog.records if r.name == "gateway"]
    assert any("[redacted]" in m for m in failures)  # the gateway's own lines too
    stored = data_text(senv.data_dir)
    assert "/v1/responses" in stored  # the call log was written
    for text in [*[s.decode("utf-8", "replace") for s in seen], logs, stored]:
        assert CANARY not in text
        assert CANARY[8:] not in text  # nor its random part alone


# BUG: a key written with JSON escapes inside a stream event reaches the client. The JSON
# path re-encodes a reply holding `\u` escapes to find such a key (Upstream._fetch, 1995), but
# SSERelay.feed (gateway.py:2961, `return self.redactor.data(b"".join(out))`, and the tail
# `self.redactor.data(event + b"\n\n")` at 2954) only replaces the key's literal bytes, so
# `"delta": "\u0073k-canary-…"` is forwarded and the client's JSON decoder yields the key.
async def test_a_key_in_json_escapes_inside_a_stream_event_is_redacted(
    senv: Env, fake: RespFake
) -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in CANARY)
    client = await start(senv, fake, upstream_api_key=CANARY)
    fake.pieces = ["key: ", "PLACEHOLDER", "."]
    fake.rewrite = lambda events: [e.replace(b"PLACEHOLDER", escaped.encode()) for e in events]
    resp = await post(client, {"model": "m", "input": PROMPT, "stream": True})
    assert resp.code == 200
    decoded = json.dumps([data for _, data in sse_events(resp.body)])
    assert CANARY not in decoded


# ---------------------------------------------------------------- 8. hostile bodies


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Each field of a Responses body: (a usual value, a hostile one); absent sometimes.
FIELDS = {
    "model": (st.sampled_from(["gpt-4o", "m", "模型", " o3 "]), st.text(max_size=30) | JSON_VALUES),
    "input": (st.text(max_size=40) | st.lists(JSON_VALUES, max_size=5), JSON_VALUES),
    "tools": (st.lists(JSON_VALUES, max_size=3), JSON_VALUES),
    "stream": (st.booleans(), JSON_VALUES),
    "stream_options": (st.none() | st.dictionaries(st.text(max_size=8), JSON_VALUES), JSON_VALUES),
    "text": (st.dictionaries(st.text(max_size=8), JSON_VALUES), JSON_VALUES),
}


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[bytes, int | None, bool]:
    """A request body, the status it must get (None: 200 or 400), and whether a 200 answer
    is a stream."""
    kind = draw(st.sampled_from(["object"] * 6 + ["nested", "any", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), None, False
    if kind == "nested":
        depth = draw(st.one_of(st.integers(1, 200), st.integers(5000, 20000)))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"content":', "}")]))
        raw = '{"model":"m","input":[' + opener * depth + '"x"' + closer * depth + "]}"
        return raw.encode(), 200 if depth <= 200 else 400, False
    if kind == "any":
        doc: Any = draw(JSON_VALUES)
    else:
        doc = {}
        for name, (usual, hostile) in FIELDS.items():
            mode = draw(st.sampled_from(["absent", "usual", "usual", "usual", "hostile"]))
            if mode != "absent":
                doc[name] = draw(usual if mode == "usual" else hostile)
        extra = st.text(max_size=10).filter(lambda k: k not in FIELDS)
        doc.update(draw(st.dictionaries(extra, JSON_VALUES, max_size=3)))
    ok = (
        isinstance(doc, dict)
        and isinstance(doc.get("model"), str)
        and bool(doc["model"].strip())
        and ("input" not in doc or isinstance(doc["input"], str | list))
        and isinstance(doc.get("stream", False), bool)
        and ("stream_options" not in doc or isinstance(doc["stream_options"], dict | None))
    )
    stream = ok and doc.get("stream") is True
    return json.dumps(doc).encode(), 200 if ok else 400, stream


@pytest.fixture
async def hostile_client(senv: Env, fake: RespFake) -> Client:
    senv.write_users(
        {"alice": {"api_key": ALICE_KEY, "daily_request_limit": 10**6, "daily_token_limit": 10**9}}
    )
    return await start(senv, fake)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=hostile_bodies())
@example(
    case=(
        json.dumps(
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                "stream": True,
            }
        ).encode(),
        200,
        True,
    )
)
@example(case=(b'{"model":"m","input":' + b"[" * 10000 + b"]" * 10000 + b"}", 400, False))
@example(case=(b'{"model":"m","input":"\\ud800"}', 400, False))  # a lone surrogate escape
@example(case=(b'{"model":"m","input":"x","stream":true,"stream_options":[]}', 400, False))
@example(case=(b"\xff\xfe{}", 400, False))
async def test_hostile_bodies_never_break_the_gateway(
    hostile_client: Client, case: tuple[bytes, int | None, bool]
) -> None:
    raw, expected, stream = case
    client = hostile_client
    before = await totals(client)
    resp = await post(client, raw=raw)
    assert resp.code in {200, 400, 429, 502}, (resp.code, resp.body[:300])
    hypothesis.event(f"{resp.code}{' stream' if stream else ''}")  # --hypothesis-show-statistics
    if expected is not None:
        assert resp.code == expected, (raw[:200], resp.body[:300])
    if resp.code == 200 and stream:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert [name for name, _ in sse_events(resp.body)] == STREAM_TYPES
    else:
        doc = json.loads(resp.body)
        assert isinstance(doc, dict)
        if resp.code != 200:
            assert {"message", "type", "param", "code"} <= set(doc["error"])
    after = await totals(client)
    charged = (1, 19) if resp.code == 200 else (0, 0)
    assert (after[0] - before[0], after[1] - before[1]) == charged


# ---------------------------------------------------------------- 10. the demo model


def demo_sdk(demo: Proc) -> openai.AsyncOpenAI:
    ai = openai.AsyncOpenAI(base_url=demo.base + "/v1", api_key=DEMO_KEY, max_retries=0)
    _SDKS.append(ai)
    return ai


async def demo_totals(demo: Proc) -> tuple[int, int]:
    http = tornado.httpclient.AsyncHTTPClient()
    resp = await http.fetch(demo.base + "/api/status.php")
    stats = json.loads(resp.body)["data"]["stats"]
    return stats["today_requests"], stats["today_tokens"]


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 3},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


async def test_the_demo_answers_create_and_stream(demo: Proc) -> None:
    ai = demo_sdk(demo)
    response = await ai.responses.create(model="demo", input="ping")
    assert "You said: ping" in response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    first = response.usage.total_tokens
    assert first == response.usage.input_tokens + response.usage.output_tokens
    kinds = []
    async with ai.responses.stream(model="demo", input="pong") as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_response()
    assert "You said: pong" in final.output_text
    assert kinds.count("response.output_text.delta") >= 2
    assert kinds[-1] == "response.completed"
    assert final.usage is not None and final.usage.output_tokens > 0
    assert await demo_totals(demo) == (2, first + final.usage.total_tokens)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_the_demo_calls_a_function_tool_with_schema_arguments(
    demo: Proc, stream: bool
) -> None:
    ai = demo_sdk(demo)
    tools: Any = [WEATHER_TOOL]
    if stream:
        async with ai.responses.stream(model="demo", input="weather?", tools=tools) as s:
            response: Any = await s.get_final_response()
    else:
        response = await ai.responses.create(model="demo", input="weather?", tools=tools)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert call.call_id
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city", "days", "unit"}
    assert isinstance(arguments["city"], str)
    assert type(arguments["days"]) is int and arguments["days"] >= 3
    assert arguments["unit"] in ("celsius", "fahrenheit")
    # with the tool's result given back, it answers in text
    follow = await ai.responses.create(
        model="demo",
        tools=tools,
        input=[
            {"role": "user", "content": "weather?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert follow.output_text
    assert not [item for item in follow.output if item.type == "function_call"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_the_demo_answers_a_json_schema_format(demo: Proc, stream: bool) -> None:
    ai = demo_sdk(demo)
    text: Any = {"format": {"type": "json_schema", "name": "x", "schema": PERSON_SCHEMA}}
    if stream:
        async with ai.responses.stream(model="demo", input="who?", text=text) as s:
            response: Any = await s.get_final_response()
    else:
        response = await ai.responses.create(model="demo", input="who?", text=text)
    value = json.loads(response.output_text)
    assert set(value) == {"name", "age", "tags"}
    assert isinstance(value["name"], str)
    assert type(value["age"]) is int
    assert isinstance(value["tags"], list) and all(isinstance(t, str) for t in value["tags"])


async def test_the_demo_output_parses_with_the_sdk_parse_helper(demo: Proc) -> None:
    from pydantic import BaseModel  # noqa: PLC0415 - only this test needs it

    class Person(BaseModel):
        name: str
        age: int
        tags: list[str]

    parsed = await demo_sdk(demo).responses.parse(model="demo", input="who?", text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
