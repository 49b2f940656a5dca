"""Anthropic's Messages API through the gateway: POST /v1/messages and /v1/messages/count_tokens,
driven black-box with the official `anthropic` SDK and raw HTTP, against a fake Anthropic
upstream (tests/fakes.py) and against the --demo process's own mock."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
import tornado.httpclient
import tornado.testing
from conftest import ALICE_KEY, ALL_SECRETS, Client, Env, Proc, data_text
from fakes import ANTHROPIC_FINAL_OUTPUT as FINAL_OUTPUT
from fakes import ANTHROPIC_MODEL as MODEL
from fakes import ANTHROPIC_USAGE as USAGE
from fakes import FakeAnthropic, serve_anthropic, sse_events, stop_server
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

TEAM_KEY = "sk-ant-team-CANARY-7f3e9a1b5c"  # the gateway's Anthropic key in most tests
CANARY = "sk-ant-canary-0123456789ABCDEFxyz"
WRONG_KEY = "sk-wrong-CANARY-0000111122"
DEMO_KEY = "your-api-key-here"
BETA = "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"
MSGS: list[dict[str, Any]] = [{"role": "user", "content": "hello there"}]
VALID: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": MSGS}

PROMPT = 25 + 7 + 100  # the fake's usage: input + cache writes + cache reads
ERROR_TYPES = {
    "authentication_error",
    "invalid_request_error",
    "rate_limit_error",
    "not_found_error",
    "api_error",
    "overloaded_error",
    "request_too_large",
    "permission_error",
}


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    f = serve_anthropic(FakeAnthropic())
    yield f
    await stop_server(f)


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads these when an argument is not given; the tests give what they mean."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def start(senv: Env, fake: FakeAnthropic, **overrides: Any) -> Client:
    config: dict[str, Any] = {"anthropic_base_url": fake.url, "anthropic_api_key": TEAM_KEY}
    config.update(overrides)
    return await senv.start(**config)


def sdk(base: str, key: str | None = ALICE_KEY, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=base, api_key=key, **kwargs)


async def totals(client: Client) -> tuple[int, int]:
    stats = (await client.status())["stats"]
    return stats["today_requests"], stats["today_tokens"]


def settles(env: Env) -> list[dict[str, Any]]:
    """The journal's settle records (the charges), read from disk."""
    path = env.data_dir / f"{env.gateways[0].clock.today()}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [r for r in (json.loads(x) for x in lines if x) if r["k"] == "s"]


async def wait_for_settles(env: Env, n: int) -> list[dict[str, Any]]:
    for _ in range(200):
        if len(records := settles(env)) >= n:
            return records
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} charges: {settles(env)}")


async def fetch(
    client: Client,
    path: str = "/v1/messages",
    *,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    key: str | None = ALICE_KEY,
    on_chunk: Any = None,
) -> tornado.httpclient.HTTPResponse:
    h = {
        "Content-Type": "application/json",
        **({"x-api-key": key} if key else {}),
        **(headers or {}),
    }
    data = body if isinstance(body, bytes) else json.dumps(VALID if body is None else body).encode()
    resp = await client.http.fetch(
        client.base + path,
        method="POST",
        body=data,
        headers=h,
        raise_error=False,
        request_timeout=30,
        streaming_callback=on_chunk,
    )
    assert resp.code != 599, resp.error
    return resp


def assert_anthropic_error(doc: Any, kind: str | None = None) -> None:
    assert isinstance(doc, dict) and doc.get("type") == "error", doc
    error = doc["error"]
    assert error["type"] in ERROR_TYPES, doc
    assert isinstance(error["message"], str) and error["message"], doc
    assert "code" in error, doc
    if kind is not None:
        assert error["type"] == kind, doc


# ---------------------------------------------------------------- 1. messages.create


async def test_create_relays_with_the_team_key_and_charges_cache_tokens(
    senv: Env, fake: FakeAnthropic
) -> None:
    """The text comes back; the upstream sees the team's key as x-api-key, the client's
    anthropic-version and anthropic-beta, and no trace of the user's key; the charge is
    input + cache writes + cache reads + output."""
    client = await start(senv, fake)
    async with sdk(client.base, default_headers={"anthropic-beta": BETA}) as ai:
        raw = await ai.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=64,
            messages=MSGS,  # type: ignore[arg-type]
        )
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello, world!"
    assert message.usage.cache_read_input_tokens == 100
    assert raw.headers["x-ratelimit-remaining-requests"] == "19"
    assert len(fake.requests) == 1
    path, headers, body = fake.requests[0]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == TEAM_KEY
    assert "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"  # what the SDK sent
    assert headers["anthropic-beta"] == BETA
    assert ALICE_KEY not in json.dumps(headers) + json.dumps(body)
    assert (body["model"], body["max_tokens"], body["messages"]) == (MODEL, 64, MSGS)
    assert await totals(client) == (1, PROMPT + 12)
    record = settles(senv)[-1]
    assert (record["p"], record["c"], record["n"]) == (PROMPT, 12, PROMPT + 12)
    assert "e" not in record  # the upstream's exact usage, not an estimate


async def test_anthropic_version_defaults_and_passes_through(
    senv: Env, fake: FakeAnthropic
) -> None:
    """No anthropic-version from the client: the default goes upstream; else the client's."""
    client = await start(senv, fake)
    assert (await fetch(client)).code == 200
    assert fake.requests[-1][1]["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in fake.requests[-1][1]
    resp = await fetch(client, headers={"anthropic-version": "2099-01-01", "anthropic-beta": "b1"})
    assert resp.code == 200
    assert fake.requests[-1][1]["anthropic-version"] == "2099-01-01"
    assert fake.requests[-1][1]["anthropic-beta"] == "b1"
    assert json.loads(resp.body)["content"][0]["text"] == "Hello, world!"
    assert await totals(client) == (2, 2 * (PROMPT + 12))


# ---------------------------------------------------------------- 2. messages.stream


@pytest.mark.parametrize("repeats_input", [False, True], ids=["output_only", "cumulative_usage"])
async def test_stream_with_the_sdk_is_charged_exactly(
    senv: Env, fake: FakeAnthropic, repeats_input: bool
) -> None:
    """The whole text arrives; the charge is message_start's input (cache fields included)
    plus the last message_delta's output. A message_delta that repeats the input counts
    (as the current API sends them) replaces them: the latest value of each holds."""
    if repeats_input:
        fake.delta_usage = {**USAGE, "output_tokens": FINAL_OUTPUT}
    client = await start(senv, fake)
    async with sdk(client.base) as ai:
        async with ai.messages.stream(
            model=MODEL,
            max_tokens=64,
            messages=MSGS,  # type: ignore[arg-type]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "Hello, world!"
    assert final.content[0].text == "Hello, world!"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    usage = final.usage
    assert (usage.input_tokens, usage.output_tokens) == (25, FINAL_OUTPUT)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (7, 100)
    assert fake.requests[0][2]["stream"] is True
    assert fake.requests[0][1]["x-api-key"] == TEAM_KEY
    assert await totals(client) == (1, PROMPT + FINAL_OUTPUT)
    record = settles(senv)[-1]
    assert (record["p"], record["c"]) == (PROMPT, FINAL_OUTPUT)
    assert "partial" not in record and "e" not in record


async def test_message_stop_comes_last_and_only_after_the_charge(
    senv: Env, fake: FakeAnthropic
) -> None:
    """Events arrive in the upstream's order with message_stop last; when the client reads
    message_stop, the charge is already in the journal on disk."""
    fake.event_delay = 0.01
    client = await start(senv, fake, fsync=True)  # the charge's write yields to the loop
    seen: list[tuple[bytes, int]] = []

    def on_chunk(data: bytes) -> None:
        seen.append((data, len(settles(senv))))

    resp = await fetch(client, body={**VALID, "stream": True}, on_chunk=on_chunk)
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = b"".join(d for d, _ in seen)
    names = [name for name, _ in sse_events(raw)]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert raw.rstrip().endswith(b'data: {"type": "message_stop"}')
    stop_chunk = next(i for i, (d, _) in enumerate(seen) if b"message_stop" in d)
    assert seen[stop_chunk][1] == 1  # charged before message_stop was sent
    assert seen[0][1] == 0  # and not before the stream began
    assert await totals(client) == (1, PROMPT + FINAL_OUTPUT)


# ---------------------------------------------------------------- 3. keys


async def test_bearer_auth_works_and_a_wrong_key_is_an_authentication_error(
    senv: Env, fake: FakeAnthropic
) -> None:
    client = await start(senv, fake)
    async with anthropic.AsyncAnthropic(
        base_url=client.base, api_key=None, auth_token=ALICE_KEY, max_retries=0
    ) as ai:
        message = await ai.messages.create(model=MODEL, max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
    assert message.content[0].text == "Hello, world!"  # type: ignore[union-attr]
    headers = fake.requests[-1][1]
    assert headers["x-api-key"] == TEAM_KEY
    assert "authorization" not in headers
    assert ALICE_KEY not in json.dumps(headers)
    for kwargs in ({"api_key": WRONG_KEY}, {"api_key": None, "auth_token": WRONG_KEY}):
        async with anthropic.AsyncAnthropic(base_url=client.base, max_retries=0, **kwargs) as bad:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await bad.messages.create(model=MODEL, max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
            assert refused.value.status_code == 401
            assert_anthropic_error(refused.value.body, "authentication_error")
            with pytest.raises(anthropic.AuthenticationError):
                async with bad.messages.stream(
                    model=MODEL,
                    max_tokens=8,
                    messages=MSGS,  # type: ignore[arg-type]
                ) as stream:
                    await stream.get_final_message()
    resp = await fetch(client, key=None)  # no key at all
    assert resp.code == 401
    assert_anthropic_error(json.loads(resp.body), "authentication_error")
    assert len(fake.requests) == 1  # the refused calls never went upstream
    assert await totals(client) == (1, PROMPT + 12)


# ---------------------------------------------------------------- 4. broken streams


async def test_a_stream_cut_after_content_ends_in_an_error_event_and_is_charged(
    senv: Env, fake: FakeAnthropic
) -> None:
    fake.cut_after = 5  # message_start, content_block_start, ping, two deltas; then the cut
    fake.event_delay = 0.02  # the events before the cut reach the gateway first
    client = await start(senv, fake)
    resp = await fetch(client, body={**VALID, "stream": True})
    assert resp.code == 200
    events = sse_events(resp.body)
    assert [n for n, _ in events][:5] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
    ]
    name, error = events[-1]
    assert name == "error"
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert b"message_stop" not in resp.body
    requests, tokens = await totals(client)
    assert requests == 1
    assert tokens > PROMPT  # message_start's input and cache tokens, plus some output
    record = settles(senv)[-1]
    assert record["partial"] == 1
    assert record["p"] == PROMPT
    # the SDK raises the error event
    async with sdk(client.base) as ai:
        with pytest.raises(anthropic.APIStatusError) as broken:
            stream = await ai.messages.create(
                model=MODEL,
                max_tokens=8,
                messages=MSGS,
                stream=True,  # type: ignore[arg-type]
            )
            async for _ in stream:
                pass
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert (await totals(client))[0] == 2


async def _leave_mid_stream(client: Client, words: int) -> bytes:
    """Open a stream on a raw socket, read until `words` content deltas came, then leave."""
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({**VALID, "stream": True}).encode()
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: "
        + ALICE_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    await writer.drain()
    received = b""
    while received.count(b"event: content_block_delta") < words:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, received
        received += chunk
    writer.close()
    return received


async def test_a_client_leaving_mid_stream_is_charged(senv: Env, fake: FakeAnthropic) -> None:
    fake.pieces = ["word "] * 60
    fake.event_delay = 0.03
    client = await start(senv, fake)
    await _leave_mid_stream(client, 5)
    await asyncio.wait_for(fake.client_left.wait(), 3)  # the upstream call was cancelled
    assert not fake.stream_finished
    record = (await wait_for_settles(senv, 1))[-1]
    assert record["partial"] == 1
    assert record["p"] == PROMPT
    requests, tokens = await totals(client)
    assert requests == 1 and tokens == record["n"] > PROMPT


@pytest.mark.parametrize("how", ["upstream_cut", "client_left"])
async def test_a_broken_stream_charges_the_output_it_delivered(
    senv: Env, fake: FakeAnthropic, how: str
) -> None:
    """message_start carries usage.output_tokens (1, as Anthropic sends it): a stream that
    breaks after content is charged the prompt message_start reported plus the output it
    delivered (estimated), not that placeholder."""
    fake.pieces = ["word "] * 60  # 300 ASCII characters: 75 tokens by the gateway's estimate
    fake.event_delay = 0.01
    client = await start(senv, fake)
    if how == "upstream_cut":
        fake.cut_after = 3 + 40  # forty deltas, "word " each, reach the client
        resp = await fetch(client, body={**VALID, "stream": True})
        delivered = "".join(
            d["delta"]["text"] for n, d in sse_events(resp.body) if n == "content_block_delta"
        )
        assert sse_events(resp.body)[-1][0] == "error"
    else:
        received = await _leave_mid_stream(client, 40)
        delivered = "word " * received.count(b"event: content_block_delta")
    record = (await wait_for_settles(senv, 1))[-1]
    assert record["p"] == PROMPT
    assert len(delivered) >= 200
    # at least the delivered text, estimated at 4 characters per token
    assert record["c"] >= len(delivered) // 4, record


# ---------------------------------------------------------------- 5. concurrency


async def test_concurrent_streams_never_exceed_the_daily_limit(
    senv: Env, fake: FakeAnthropic
) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 3}})
    fake.event_delay = 0.02  # every stream is still running when the last one is refused
    client = await start(senv, fake)

    async def one(ai: anthropic.AsyncAnthropic) -> str | anthropic.RateLimitError:
        try:
            stream = await ai.messages.create(
                model=MODEL,
                max_tokens=8,
                messages=MSGS,
                stream=True,  # type: ignore[arg-type]
            )
            return "".join(
                [e.delta.text async for e in stream if e.type == "content_block_delta"]  # type: ignore[union-attr]
            )
        except anthropic.RateLimitError as e:
            return e

    async with sdk(client.base) as ai:
        results = await asyncio.gather(*(one(ai) for _ in range(10)))
    done = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, anthropic.RateLimitError)]
    assert done == ["Hello, world!"] * 3
    assert len(refused) == 7
    for e in refused:
        assert e.status_code == 429
        assert_anthropic_error(e.body, "rate_limit_error")
        assert e.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 3
    assert await totals(client) == (3, 3 * (PROMPT + FINAL_OUTPUT))


# ---------------------------------------------------------------- 6. count_tokens


async def test_count_tokens_is_relayed_and_never_charged(senv: Env, fake: FakeAnthropic) -> None:
    client = await start(senv, fake)
    async with sdk(client.base, default_headers={"anthropic-beta": BETA}) as ai:
        for _ in range(3):
            counted = await ai.messages.count_tokens(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
            assert counted.input_tokens == 42  # the upstream's answer
    path, headers, body = fake.requests[-1]
    assert path == "/v1/messages/count_tokens"
    assert headers["x-api-key"] == TEAM_KEY
    assert "authorization" not in headers
    assert headers["anthropic-beta"] == BETA
    assert body == {"model": MODEL, "messages": MSGS}
    assert await totals(client) == (0, 0)
    assert settles(senv) == []
    async with sdk(client.base, key=WRONG_KEY) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await bad.messages.count_tokens(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    assert_anthropic_error(refused.value.body, "authentication_error")
    for invalid in ({"model": MODEL}, {"model": MODEL, "messages": []}, {"messages": MSGS}):
        resp = await fetch(client, "/v1/messages/count_tokens", body=invalid)
        assert resp.code == 400, invalid
        assert_anthropic_error(json.loads(resp.body), "invalid_request_error")
    assert len(fake.requests) == 3
    assert await totals(client) == (0, 0)


# ---------------------------------------------------------------- 7. validation


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != key}


INVALID_BODIES: dict[str, bytes | dict[str, Any]] = {
    "no_max_tokens": _without("max_tokens"),
    "max_tokens_0": {**VALID, "max_tokens": 0},
    "max_tokens_negative": {**VALID, "max_tokens": -1},
    "max_tokens_string": {**VALID, "max_tokens": "5"},
    "max_tokens_true": {**VALID, "max_tokens": True},
    "max_tokens_float": {**VALID, "max_tokens": 5.0},
    "max_tokens_null": {**VALID, "max_tokens": None},
    "messages_empty": {**VALID, "messages": []},
    "messages_missing": _without("messages"),
    "messages_string": {**VALID, "messages": "hi"},
    "messages_of_strings": {**VALID, "messages": ["hi"]},
    "model_missing": _without("model"),
    "model_number": {**VALID, "model": 5},
    "stream_string": {**VALID, "stream": "true"},
    "stream_number": {**VALID, "stream": 1},
    "array": b"[]",
    "not_json": b"{nope",
    "empty": b"",
}


@pytest.mark.parametrize("case", list(INVALID_BODIES))
async def test_invalid_bodies_are_400_and_free(senv: Env, fake: FakeAnthropic, case: str) -> None:
    client = await start(senv, fake)
    body = INVALID_BODIES[case]
    resp = await fetch(client, body=body)
    assert resp.code == 400, resp.body
    assert_anthropic_error(json.loads(resp.body), "invalid_request_error")
    assert fake.requests == []
    assert await totals(client) == (0, 0)


BAD_HEADERS = {
    "version_too_long": {"anthropic-version": "2023-06-01" + "x" * 510},
    "version_tab": {"anthropic-version": "2023-06-01\tx"},
    "version_latin1": {"anthropic-version": "2023-06-01\xe9"},
    "version_nbsp": {"anthropic-version": "2023\xa006"},
    "beta_too_long": {"anthropic-beta": "b" * 513},
    "beta_tab": {"anthropic-beta": "a\tb"},
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_hostile_anthropic_headers_are_400_and_free(
    senv: Env, fake: FakeAnthropic, case: str, stream: bool
) -> None:
    client = await start(senv, fake)
    body = {**VALID, "stream": stream}
    resp = await fetch(client, body=body, headers=BAD_HEADERS[case])
    assert resp.code == 400, resp.body
    assert_anthropic_error(json.loads(resp.body), "invalid_request_error")
    assert fake.requests == []
    assert await totals(client) == (0, 0)
    ok = await fetch(
        client, body=body, headers={"anthropic-version": "2023-06-01", "anthropic-beta": "b" * 512}
    )
    assert ok.code == 200  # 512 printable characters are fine
    assert fake.requests[-1][1]["anthropic-beta"] == "b" * 512


@pytest.mark.parametrize("value", ["2023\x7f06", "a\x01b", "x\x1b[31m"], ids=["del", "soh", "esc"])
async def test_control_characters_in_anthropic_headers_are_an_anthropic_400(
    senv: Env, fake: FakeAnthropic, value: str
) -> None:
    """Tornado refuses a header value with a control character as malformed HTTP; the 400
    is still in Anthropic's shape, since the request line named /v1/messages."""
    client = await start(senv, fake)
    resp = await fetch(client, body={**VALID, "stream": True}, headers={"anthropic-version": value})
    assert resp.code == 400
    doc = json.loads(resp.body)
    assert fake.requests == []
    assert await totals(client) == (0, 0)
    assert_anthropic_error(doc, "invalid_request_error")


# ---------------------------------------------------------------- 8. daily limit


async def test_a_daily_limit_is_a_rate_limit_error_at_once(senv: Env, fake: FakeAnthropic) -> None:
    """The SDK at its default retries raises RateLimitError within 2 s (x-should-retry: false)
    instead of sleeping for Retry-After, which is the rest of the day."""
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await start(senv, fake)
    async with anthropic.AsyncAnthropic(base_url=client.base, api_key=ALICE_KEY) as ai:
        await ai.messages.create(model=MODEL, max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
        for stream in (False, True):
            t0 = time.monotonic()
            with pytest.raises(anthropic.RateLimitError) as limited:
                await ai.messages.create(
                    model=MODEL,
                    max_tokens=8,
                    messages=MSGS,
                    stream=stream,  # type: ignore[arg-type]
                )
            assert time.monotonic() - t0 < 2
            err = limited.value
            assert err.status_code == 429
            assert err.response.headers["x-should-retry"] == "false"
            assert 1 <= int(err.response.headers["retry-after"]) <= 86400
            assert_anthropic_error(err.body, "rate_limit_error")
            assert err.body["error"]["details"]["daily_request_limit"] == 1  # type: ignore[index]
    assert len(fake.requests) == 1
    assert await totals(client) == (1, PROMPT + 12)


# ---------------------------------------------------------------- 9. no key, upstream failures


async def test_no_anthropic_key_configured_is_a_500(senv: Env, fake: FakeAnthropic) -> None:
    client = await senv.start(anthropic_base_url=fake.url)  # no anthropic_api_key
    for path, body in (
        ("/v1/messages", VALID),
        ("/v1/messages", {**VALID, "stream": True}),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": MSGS}),
    ):
        resp = await fetch(client, path, body=body)
        assert resp.code == 500, (path, body, resp.body)
        assert_anthropic_error(json.loads(resp.body), "api_error")
    async with sdk(client.base) as ai:
        with pytest.raises(anthropic.InternalServerError) as e500:
            await ai.messages.create(model=MODEL, max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
    assert e500.value.status_code == 500
    assert fake.requests == []
    assert await totals(client) == (0, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failure_before_any_byte_is_a_free_502(
    senv: Env, fake: FakeAnthropic, stream: bool
) -> None:
    """An upstream error status, a hang-up, a 200 stream closed before its first event, an
    upstream that is down: 502 api_error, and nothing charged."""
    client = await start(senv, fake)
    body = {**VALID, "stream": stream}
    fake.status = 529  # Anthropic's "overloaded"
    failures = [await fetch(client, body=body)]
    fake.status, fake.hang_up = 200, True
    failures.append(await fetch(client, body=body))
    fake.hang_up = False
    if stream:
        fake.cut_after = 0
        failures.append(await fetch(client, body=body))
    down = await senv.start(
        anthropic_base_url=f"http://127.0.0.1:{tornado.testing.bind_unused_port()[1]}/v1",
        anthropic_api_key=TEAM_KEY,
    )
    failures.append(await fetch(down, body=body))
    for resp in failures:
        assert resp.code == 502, resp.body
        assert not resp.headers["Content-Type"].startswith("text/event-stream")
        doc = json.loads(resp.body)
        assert_anthropic_error(doc, "api_error")
    assert len(fake.requests) == 3 if stream else 2
    assert await totals(client) == (0, 0)
    assert await totals(down) == (0, 0)
    assert settles(senv) == []


# ---------------------------------------------------------------- 10. the canary key


async def test_the_anthropic_key_never_leaks(
    senv: Env, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("gateway", "tornado", "tornado.access", "tornado.application", "tornado.general"):
        caplog.set_level(logging.DEBUG, logger=name)
    client = await start(senv, fake, anthropic_api_key=CANARY)
    seen: list[bytes] = []

    def keep(resp: tornado.httpclient.HTTPResponse) -> tornado.httpclient.HTTPResponse:
        seen.append(resp.body + json.dumps(dict(resp.headers.get_all())).encode())
        return resp

    # an upstream 401 that echoes the key, to a JSON call, a stream and count_tokens
    fake.status = 401
    assert keep(await fetch(client)).code == 502
    assert keep(await fetch(client, body={**VALID, "stream": True})).code == 502
    count = {"model": MODEL, "messages": MSGS}
    assert keep(await fetch(client, "/v1/messages/count_tokens", body=count)).code == 502
    async with sdk(client.base) as ai:
        with pytest.raises(anthropic.InternalServerError) as e502:
            await ai.messages.create(model=MODEL, max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
    seen.append(str(e502.value).encode() + json.dumps(e502.value.body).encode())
    # a stream and a JSON reply that echo it in the text and in the message id
    fake.status = 200
    fake.pieces = ["Your key is ", "{key}", " and again: {key}."]
    fake.message_id = "msg_{key}"
    for body in (VALID, {**VALID, "stream": True}):
        resp = keep(await fetch(client, body=body))
        assert resp.code == 200
        assert b"[redacted]" in resp.body
    # the stream cut after the echo: an error event, a partial charge in the call log
    fake.cut_after = 5
    fake.event_delay = 0.02
    resp = keep(await fetch(client, body={**VALID, "stream": True}))
    assert sse_events(resp.body)[-1][0] == "error"
    await senv.stop()  # logs flushed, data written
    assert all(h["x-api-key"] == CANARY for _, h, _ in fake.requests)  # it was echoed back
    logs = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    logs += caplog.text
    assert "/v1/messages" in logs  # the access log ran and was captured
    stored = data_text(senv.data_dir)
    assert "alice" in stored
    for secret in (CANARY, *ALL_SECRETS):
        for text in seen:
            assert secret.encode() not in text
        assert secret not in logs
        assert secret not in stored
    assert CANARY[:16] not in logs + stored  # not even a fragment


async def test_a_json_escaped_key_echo_never_reaches_the_client(
    senv: Env, fake: FakeAnthropic
) -> None:
    """An upstream that echoes the key with a JSON escape ("\\u0073k-ant-…", which any JSON
    decoder reads as the key) has it redacted in a JSON reply and in a stream event alike.
    (A regression test: 00c06a1 redacted stream events only where the key's exact bytes
    occurred, so the SDK's decoded text held the whole key; fixed in a9a6e3e.)"""
    client = await start(senv, fake, anthropic_api_key=CANARY)
    fake.escape_key = True
    fake.pieces = ["Your key is ", "{key}", "."]
    resp = await fetch(client)
    assert resp.code == 200
    assert CANARY not in json.dumps(json.loads(resp.body)["content"])
    resp = await fetch(client, body={**VALID, "stream": True})
    assert resp.code == 200
    assert CANARY.encode() not in resp.body
    text = "".join(
        d["delta"]["text"] for n, d in sse_events(resp.body) if n == "content_block_delta"
    )
    assert CANARY not in text  # not in the text the SDK decodes either
    assert "[redacted]" in text


# ---------------------------------------------------------------- 11. hostile bodies


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", ""]), "content": _JSON}
)


def _mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """Valid three times in four: enough bodies get through to test the 200 side too."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else hostile)


_EXTRAS = {
    "stream": st.booleans() | _JSON,
    "system": _JSON,
    "tools": _JSON,
    "metadata": _JSON,
    "temperature": _JSON,
}
_BODY = _mostly(
    st.fixed_dictionaries(
        {
            "model": _mostly(
                st.sampled_from([MODEL, "claude-3-5-haiku-latest"])
                | st.text(min_size=1, max_size=30).filter(str.strip),
                _JSON,
            ),
            "messages": _mostly(st.lists(_MESSAGE, min_size=1, max_size=3), _JSON),
            "max_tokens": _mostly(st.integers(1, 10**9), st.integers(-3, 0) | _JSON),
        },
        optional=_EXTRAS,
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just(MODEL) | _JSON,
            "messages": st.lists(_MESSAGE, min_size=1, max_size=3) | _JSON,
            "max_tokens": st.integers(-3, 10**12) | _JSON,
            **_EXTRAS,
        },
    ),
)
_HEADER = _mostly(
    st.none(),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t\xe9\xa0"),
        min_size=1,
        max_size=600,
    ),
)


def _expected_ok(doc: Any, header: str | None) -> bool:
    """The spec's validation, as a reference model."""
    if header is not None:
        value = header.strip(" \t")
        if not (1 <= len(value) <= 512 and all(0x20 <= ord(c) <= 0x7E for c in value)):
            return False
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return False
    if not doc["model"].strip():
        return False  # a blank model name is refused as on every route
    messages = doc.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        return False
    max_tokens = doc.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        return False
    return "stream" not in doc or isinstance(doc["stream"], bool)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=_mostly(
        _BODY.map(lambda d: json.dumps(d).encode()),
        _JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40),
    ),
    header=_HEADER,
)
async def test_hostile_bodies_get_a_200_or_an_anthropic_error(
    senv: Env, fake: FakeAnthropic, body: bytes, header: str | None
) -> None:
    if not senv.gateways:
        senv.write_users(
            {
                "alice": {
                    "api_key": ALICE_KEY,
                    "daily_request_limit": 10**6,
                    "daily_token_limit": 10**12,
                }
            }
        )
        await start(senv, fake)
    client = Client(f"http://127.0.0.1:{senv.gateways[0].port}", senv.http)
    before, sent = (await totals(client))[0], len(fake.requests)
    headers = {} if header is None else {"anthropic-version": header}
    resp = await fetch(client, body=body, headers=headers)
    assert resp.code in (200, 400, 429, 502), (resp.code, resp.body[:300])
    event(f"status {resp.code}")
    try:
        doc: Any = json.loads(body)
    except ValueError:
        doc = None
    expected = _expected_ok(doc, header)
    assert (resp.code == 200) == expected, (resp.code, resp.body[:300], body[:300], header)
    if resp.code == 200 and doc.get("stream") is True:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert sse_events(resp.body)[-1][0] == "message_stop"
    else:
        answer = json.loads(resp.body)
        if resp.code == 200:
            assert answer["type"] == "message"
        else:
            assert_anthropic_error(answer)
            if resp.code == 400:
                assert answer["error"]["type"] == "invalid_request_error"
    assert (await totals(client))[0] - before == int(expected)
    assert len(fake.requests) - sent == int(expected)


# ---------------------------------------------------------------- 12. the demo


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1},
        },
        "required": ["city", "unit"],
    },
}


async def _demo_requests(demo: Proc, http: tornado.httpclient.AsyncHTTPClient) -> int:
    resp = await http.fetch(demo.base + "/api/status.php")
    return int(json.loads(resp.body)["data"]["stats"]["today_requests"])


async def test_the_demo_speaks_the_messages_api(demo: Proc) -> None:
    http = tornado.httpclient.AsyncHTTPClient()
    async with sdk(demo.base, key=DEMO_KEY) as ai:
        message = await ai.messages.create(
            model="demo", max_tokens=100, messages=[{"role": "user", "content": "ping"}]
        )
        assert message.role == "assistant" and message.stop_reason == "end_turn"
        assert "You said: ping" in message.content[0].text  # type: ignore[union-attr]
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

        async with ai.messages.stream(
            model="demo", max_tokens=100, messages=[{"role": "user", "content": "stream me"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert "You said: stream me" in text
        assert final.content[0].text == text  # type: ignore[union-attr]
        assert final.usage.output_tokens > 1

        asked = [{"role": "user", "content": "weather in Paris?"}]
        called = await ai.messages.create(
            model="demo",
            max_tokens=100,
            messages=asked,
            tools=[WEATHER_TOOL],  # type: ignore[arg-type,list-item]
        )
        assert called.stop_reason == "tool_use"
        use = next(b for b in called.content if b.type == "tool_use")
        assert use.name == "get_weather"  # type: ignore[union-attr]
        tool_input = use.input  # type: ignore[union-attr]
        assert isinstance(tool_input, dict)
        assert {"city", "unit"} <= set(tool_input)
        assert tool_input["unit"] in ("celsius", "fahrenheit")
        assert isinstance(tool_input["city"], str)

        async with ai.messages.stream(
            model="demo",
            max_tokens=100,
            messages=asked,
            tools=[WEATHER_TOOL],  # type: ignore[arg-type,list-item]
        ) as stream:
            streamed = await stream.get_final_message()
        streamed_use = next(b for b in streamed.content if b.type == "tool_use")
        assert {"city", "unit"} <= set(streamed_use.input)  # type: ignore[union-attr,arg-type]

        before = await _demo_requests(demo, http)
        assert before == 4
        counted = await ai.messages.count_tokens(
            model="demo", messages=[{"role": "user", "content": "count these words please"}]
        )
        assert counted.input_tokens > 0
        assert await _demo_requests(demo, http) == before  # count_tokens is free
