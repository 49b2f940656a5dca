"""The OpenAI-compatible surface, driven with the official `openai` SDK and with raw SSE."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
import pytest
import tornado.httpclient
from conftest import ALICE_KEY, UPSTREAM_KEY, Client, Env, free_port

MESSAGES = [{"role": "user", "content": "hello there"}]


def sdk(client: Client, key: str = ALICE_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=client.base + "/v1", api_key=key, max_retries=0)


def settles(env: Env) -> list[dict[str, Any]]:
    day = env.gateways[0].clock.today()
    text = (env.data_dir / f"{day}.jsonl").read_text()
    return [r for r in (json.loads(x) for x in text.split("\n") if x) if r["k"] == "s"]


async def totals(client: Client) -> tuple[int, int]:
    stats = (await client.status())["stats"]
    return stats["today_requests"], stats["today_tokens"]


async def test_chat_completion_with_the_sdk(env: Env) -> None:
    client = await env.start()
    ai = sdk(client)
    raw = await ai.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "pong"
    assert completion.usage is not None and completion.usage.total_tokens == 15
    assert raw.headers["x-ratelimit-limit-requests"] == "20"
    assert raw.headers["x-ratelimit-remaining-requests"] == "19"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "99985"
    headers, body = env.upstream.requests[-1]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert json.loads(body)["messages"] == MESSAGES
    assert await totals(client) == (1, 15)


async def test_x_api_key_header_also_works(env: Env) -> None:
    client = await env.start()
    status, doc, _ = await client.call(path="/v1/chat/completions")
    assert status == 200
    assert doc["object"] == "chat.completion"  # the upstream's body, no envelope


async def test_stream_without_include_usage_strips_the_usage_chunk(env: Env) -> None:
    client = await env.start()
    stream = await sdk(client).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert all(c.usage is None for c in chunks)
    upstream_request = json.loads(env.upstream.requests[-1][1])
    assert upstream_request["stream_options"] == {"include_usage": True}
    assert await totals(client) == (1, 15)  # charged the upstream's exact usage
    assert "e" not in settles(env)[-1]


async def test_stream_with_include_usage_passes_the_usage_chunk(env: Env) -> None:
    client = await env.start()
    stream = await sdk(client).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert await totals(client) == (1, 15)


async def test_stream_without_upstream_usage_is_estimated_and_charged(env: Env) -> None:
    env.upstream.usage = None
    client = await env.start()
    stream = await sdk(client).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True
    )
    assert [c async for c in stream]
    record = settles(env)[-1]
    assert record["e"] == 1
    # "hello there" = 11 ASCII chars -> 3 tokens; "Hello world" -> 3 tokens
    assert (record["p"], record["c"], record["n"]) == (3, 3, 6)
    assert await totals(client) == (1, 6)


async def test_completions_and_embeddings(env: Env) -> None:
    client = await env.start()
    ai = sdk(client)
    completion = await ai.completions.create(model="gpt-3.5-turbo-instruct", prompt="say pong")
    assert completion.choices[0].text == "pong"
    embedding = await ai.embeddings.create(model="text-embedding-3-small", input="abc")
    assert embedding.data[0].embedding == [0.1, 0.2]
    stream = await ai.completions.create(model="m", prompt="x", stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == "Hello world"
    assert await totals(client) == (3, 15 + 3 + 15)
    assert [r["m"] for r in settles(env)] == [
        "gpt-3.5-turbo-instruct",
        "text-embedding-3-small",
        "m",
    ]


async def test_models_from_upstream_cached_or_configured(env: Env) -> None:
    client = await env.start()
    ai = sdk(client)
    for _ in range(3):
        assert [m.id async for m in ai.models.list()] == ["m1", "m2"]
    assert env.upstream.models_calls == 1
    configured = await env.start(models="qwen-max, deepseek-chat")
    assert [m.id async for m in sdk(configured).models.list()] == ["qwen-max", "deepseek-chat"]
    assert env.upstream.models_calls == 1
    with pytest.raises(openai.AuthenticationError):
        await sdk(client, key="sk-nobody-123456").models.list()


async def test_errors_map_to_the_sdk_exception_classes(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await env.start()
    ai = sdk(client)
    with pytest.raises(openai.AuthenticationError) as auth:
        await sdk(client, key="sk-nobody-123456").chat.completions.create(
            model="m", messages=MESSAGES
        )
    assert auth.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        await ai.chat.completions.create(model="m", messages=[])
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    await ai.chat.completions.create(model="m", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited:
        await ai.chat.completions.create(model="m", messages=MESSAGES)
    err = limited.value
    assert err.body["code"] == "daily_request_limit_exceeded"  # type: ignore[index]
    assert err.body["details"]["daily_request_limit"] == 1  # type: ignore[index]
    assert 1 <= int(err.response.headers["retry-after"]) <= 86400
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "每日请求次数已达上限" in err.message


async def test_5xx_map_to_internal_server_errors(env: Env) -> None:
    down = await env.start(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.InternalServerError) as e502:
        await sdk(down).chat.completions.create(model="m", messages=MESSAGES)
    assert e502.value.status_code == 502
    assert e502.value.body["type"] == "upstream_error"  # type: ignore[index]
    nokey = await env.start(upstream_api_key="")
    with pytest.raises(openai.InternalServerError) as e500:
        await sdk(nokey).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert e500.value.status_code == 500
    env.upstream.status = 500
    ok = await env.start()
    with pytest.raises(openai.InternalServerError) as stream502:
        await sdk(ok).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert stream502.value.status_code == 502  # failed before any byte: a plain error
    assert await totals(ok) == (0, 0)


async def _raw_stream(
    client: Client, on_chunk: Any, body: dict[str, Any] | None = None
) -> tornado.httpclient.HTTPResponse:
    http = tornado.httpclient.AsyncHTTPClient()
    return await http.fetch(
        client.base + "/v1/chat/completions",
        method="POST",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        body=json.dumps(body or {"model": "m", "messages": MESSAGES, "stream": True}),
        streaming_callback=on_chunk,
        request_timeout=30,
        raise_error=False,
    )


async def test_first_chunk_arrives_before_the_upstream_finishes(env: Env) -> None:
    env.upstream.stream_delay = 0.4  # 4 chunks: the upstream takes >= 1.2 s
    client = await env.start()
    arrivals: list[tuple[float, bool, bytes]] = []

    def on_chunk(data: bytes) -> None:
        arrivals.append((time.monotonic(), env.upstream.stream_finished, data))

    t0 = time.monotonic()
    response = await _raw_stream(client, on_chunk)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    first_time, upstream_done, first = arrivals[0]
    assert first.startswith(b"data: ") and b"Hel" in first
    assert not upstream_done
    assert first_time - t0 < 0.35
    assert arrivals[-1][2].endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_mid_stream_cancels_upstream_and_charges_partial(
    env: Env,
) -> None:
    env.upstream.pieces = ["word "] * 40
    env.upstream.stream_delay = 0.05
    env.upstream.usage = None
    client = await env.start()
    port = int(client.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE_KEY.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    await writer.drain()
    received = b""
    while received.count(b"data: ") < 3:
        received += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await asyncio.wait_for(env.upstream.client_left.wait(), 2)  # the upstream call was cut
    assert not env.upstream.stream_finished
    for _ in range(50):
        if settles(env):
            break
        await asyncio.sleep(0.02)
    record = settles(env)[-1]
    assert record["partial"] == 1 and record["e"] == 1
    generated = record["c"]
    assert 1 <= generated < 40  # what was generated before the cut, not the whole answer
    assert record["p"] == 3
    assert await totals(client) == (1, record["n"])


async def test_upstream_cut_mid_stream_gives_an_error_event(env: Env) -> None:
    env.upstream.cut_after = 2
    env.upstream.stream_delay = 0.05  # the chunks before the cut reach the gateway first
    client = await env.start()
    chunks: list[bytes] = []
    response = await _raw_stream(client, chunks.append)
    events = b"".join(chunks).decode().strip().split("\n\n")
    assert response.code == 200
    assert "data: [DONE]" not in events
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "stream_interrupted"
    assert "大模型API调用失败" in last["error"]["message"]
    record = settles(env)[-1]
    assert record["partial"] == 1  # what was sent is charged, marked partial
    with pytest.raises(openai.APIError):
        stream = await sdk(client).chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        )
        async for _ in stream:
            pass
