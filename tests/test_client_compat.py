"""Clients as users run them: SDK retries that do not hang, /v1/models/{id}, and a demo model
whose answers the SDK helpers accept (a role in the first stream delta, one embedding per input,
base64 embeddings)."""

from __future__ import annotations

import base64
import datetime
import struct
import time

import openai
import pydantic
import pytest
from conftest import ALICE_KEY, Env, Proc

DEMO_KEY = "your-api-key-here"  # users.yaml's demo_only user, as the API document writes it


async def test_a_daily_limit_429_is_not_retried_by_the_sdk_at_its_defaults(senv: Env) -> None:
    """The SDK at its default retries gets RateLimitError at once (x-should-retry: false),
    instead of sleeping for Retry-After, which is the rest of the day."""
    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 1}})
    client = await senv.start()
    sdk = openai.AsyncOpenAI(base_url=client.base + "/v1", api_key=ALICE_KEY)  # default retries
    messages = [{"role": "user", "content": "hi"}]
    await sdk.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2
    headers = refused.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 0
    assert len(senv.upstream.requests) == 1  # the refused call never went upstream


async def test_one_model_by_its_id(senv: Env) -> None:
    """GET /v1/models/{id} answers the listed model; an unlisted id is a 404 NotFoundError."""
    client = await senv.start(models="gpt-4o-mini,meta-llama/Llama-3.1-8B")
    sdk = openai.AsyncOpenAI(base_url=client.base + "/v1", api_key=ALICE_KEY, max_retries=0)
    model = await sdk.models.retrieve("meta-llama/Llama-3.1-8B")
    assert (model.id, model.object) == ("meta-llama/Llama-3.1-8B", "model")
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("no-such-model")
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(
            base_url=client.base + "/v1", api_key="sk-wrong-0000000000", max_retries=0
        ).models.retrieve("gpt-4o-mini")


def demo_sdk(demo: Proc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo.base + "/v1", api_key=DEMO_KEY, max_retries=0)


async def test_the_demo_streams_what_the_sdk_stream_helper_accepts(demo: Proc) -> None:
    """The SDK's chat.completions.stream() helper runs over the demo model (it needs the role
    in the first delta) and returns the whole message."""
    sdk = demo_sdk(demo)
    async with sdk.chat.completions.stream(
        model="demo", messages=[{"role": "user", "content": "ping"}]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    message = final.choices[0].message
    assert message.role == "assistant"
    assert "You said: ping" in (message.content or "")


@pytest.mark.parametrize("encoding", ["float", "base64", None])
async def test_the_demo_embeds_each_input(demo: Proc, encoding: str | None) -> None:
    """One embedding per input, in order, as floats or as base64 float32; with no format
    given, the SDK (which then asks for base64 and decodes it) gets 16 floats for each."""
    extra = {} if encoding is None else {"encoding_format": encoding}
    raw = await demo_sdk(demo).embeddings.with_raw_response.create(
        model="demo",
        input=["one", "two", "three"],
        **extra,  # type: ignore[arg-type]
    )
    data = raw.http_response.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    vectors = [
        d["embedding"]
        if isinstance(d["embedding"], list)
        else list(struct.unpack("<16f", base64.b64decode(d["embedding"])))
        for d in data
    ]
    assert all(len(v) == 16 for v in vectors)
    assert vectors[0] != vectors[1] != vectors[2]
    if encoding != "base64":  # the SDK decodes what it asked for itself
        parsed = raw.parse()
        assert [len(d.embedding) for d in parsed.data] == [16, 16, 16]


def test_the_azure_openai_client_reaches_the_deployment_paths(demo: Proc) -> None:
    """openai.AzureOpenAI puts the model in the path (/deployments/{model}/…) and the key in
    an api-key header; both its base_url and azure_endpoint forms work, and the charge is
    the user's."""
    for client in (
        openai.AzureOpenAI(base_url=demo.base + "/v1", api_key=DEMO_KEY, api_version="2024-10-21"),
        openai.AzureOpenAI(azure_endpoint=demo.base, api_key=DEMO_KEY, api_version="2024-10-21"),
    ):
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "via azure"}]
        )
        assert reply.choices[0].message.content.endswith("You said: via azure")
        vectors = client.embeddings.create(model="demo", input=["a", "b"])
        assert [d.index for d in vectors.data] == [0, 1]
    with pytest.raises(openai.AuthenticationError):
        openai.AzureOpenAI(
            azure_endpoint=demo.base, api_key="wrong-key-000000", api_version="2024-10-21"
        ).chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])


def test_the_demo_fills_string_formats_and_sizes_of_a_schema(demo: Proc) -> None:
    """A json_schema with dates, date-times, minLength and minItems gets a value the
    schema's own validator (pydantic) accepts."""

    class Meeting(pydantic.BaseModel):
        title: str = pydantic.Field(min_length=12)
        day: datetime.date
        starts: datetime.datetime
        room: str | None = None
        people: list[str] = pydantic.Field(min_length=3)

    sync = openai.OpenAI(base_url=demo.base + "/v1", api_key=DEMO_KEY, max_retries=0)
    parsed = sync.chat.completions.parse(
        model="demo",
        messages=[{"role": "user", "content": "plan it"}],
        response_format=Meeting,
    )
    meeting = parsed.choices[0].message.parsed
    assert isinstance(meeting, Meeting)
    assert len(meeting.title) >= 12 and len(meeting.people) >= 3
