"""LangChain's OpenAI integration (langchain-openai) and the Python openai SDK against the demo
model of a real gateway process: structured output (JSON schema and function calling), tool
calls, streams, the Responses API and embeddings; then `n`, JSON mode, Azure's api-key header
on /v1 and a Bearer key on /api/call.php.

The tests are synchronous, as most LangChain code is (invoke, stream); the gateway is another
process, so nothing here waits on this test's event loop.
"""

from __future__ import annotations

import json
import math

import openai
import requests
from conftest import Proc
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

DEMO_KEY = "your-api-key-here"  # users.yaml's demo_only user
TIMEOUT = 30


def chat(demo: Proc, **options: object) -> ChatOpenAI:
    return ChatOpenAI(
        model="demo",
        base_url=demo.base + "/v1",
        api_key=DEMO_KEY,
        max_retries=0,
        timeout=TIMEOUT,
        **options,
    )


class Address(BaseModel):
    street: str
    city: str
    postcode: int


class Person(BaseModel):
    """A person, as the model extracts one from text."""

    name: str
    age: int = Field(description="age in whole years")
    height_m: float
    member: bool
    nicknames: list[str]
    address: Address
    email: str | None = Field(default=None, description="an e-mail address, if one is given")


def assert_person(person: object) -> None:
    assert isinstance(person, Person), person
    assert isinstance(person.address, Address)
    assert isinstance(person.nicknames, list)
    assert all(isinstance(n, str) for n in person.nicknames)
    assert type(person.age) is int
    assert type(person.member) is bool
    assert isinstance(person.height_m, float)
    assert person.email is None or isinstance(person.email, str)


PROMPT = "Ada Lovelace, 36, 1.65 m, member, called Ada, lives at 1 St James's Square, London."


def test_structured_output_with_a_json_schema(demo: Proc) -> None:
    """with_structured_output(Model) at its default method (json_schema, in
    response_format) gives an instance: a nested model, a list field, an Optional field."""
    structured = chat(demo).with_structured_output(Person, include_raw=True)
    result = structured.invoke(PROMPT)
    assert result["parsing_error"] is None
    assert_person(result["parsed"])
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    assert not raw.tool_calls  # it answered in the response_format, not with a tool


def test_structured_output_by_function_calling(demo: Proc) -> None:
    """with_structured_output(Model, method="function_calling"): the model is offered as a
    tool that tool_choice forces, and its call's arguments parse into the model."""
    structured = chat(demo).with_structured_output(
        Person, method="function_calling", include_raw=True
    )
    result = structured.invoke(PROMPT)
    assert result["parsing_error"] is None
    assert_person(result["parsed"])
    assert [c["name"] for c in result["raw"].tool_calls] == ["Person"]


@tool
def book_table(
    restaurant: str, guests: int, budget: float, outdoor: bool, dishes: list[str]
) -> str:
    """Book a table at a restaurant.

    Args:
        restaurant: the restaurant's name
        guests: how many people
        budget: the most to spend, in euros
        outdoor: whether to sit outside
        dishes: dishes to order ahead
    """
    return "booked"


def test_bind_tools_gives_one_tool_call_with_typed_arguments(demo: Proc) -> None:
    """bind_tools([tool]).invoke(...) is an AIMessage with one call of the tool, whose args
    are its parameters, each of its type (and the tool runs on them)."""
    message = chat(demo).bind_tools([book_table]).invoke("A table for four at Chez Demo.")
    assert isinstance(message, AIMessage)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.invalid_tool_calls
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "book_table"
    assert call["id"]
    args = call["args"]
    assert set(args) == {"restaurant", "guests", "budget", "outdoor", "dishes"}
    assert isinstance(args["restaurant"], str)
    assert type(args["guests"]) is int
    assert isinstance(args["budget"], int | float)
    assert type(args["outdoor"]) is bool
    assert isinstance(args["dishes"], list)
    assert all(isinstance(d, str) for d in args["dishes"])
    assert book_table.invoke(call).content == "booked"


def test_stream_chunks_join_to_the_reply(demo: Proc) -> None:
    """.stream() yields the reply in several chunks that join to what .invoke() answers."""
    model = chat(demo)
    whole = model.invoke("stream me").content
    assert isinstance(whole, str)
    assert "You said: stream me" in whole
    chunks = list(model.stream("stream me"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    pieces = [c.content for c in chunks if c.content]
    assert len(pieces) > 1  # it did stream
    assert "".join(pieces) == whole  # type: ignore[arg-type]
    joined = chunks[0]
    for c in chunks[1:]:
        joined += c
    assert joined.content == whole
    assert joined.response_metadata.get("finish_reason") == "stop"


def test_the_responses_api_through_langchain(demo: Proc) -> None:
    """ChatOpenAI(use_responses_api=True) calls /v1/responses and returns the text."""
    message = chat(demo, use_responses_api=True).invoke("hello responses")
    assert isinstance(message, AIMessage)
    assert "You said: hello responses" in message.text
    assert str(message.response_metadata.get("id", "")).startswith("resp_")  # a Response's id
    usage = message.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0


def test_langchain_embeddings(demo: Proc) -> None:
    """OpenAIEmbeddings.embed_documents (sending text: check_embedding_ctx_length=False)
    gives one vector of 16 finite floats per document, different for different documents;
    embed_query gives a document's own vector."""
    embeddings = OpenAIEmbeddings(
        model="demo",
        base_url=demo.base + "/v1",
        api_key=DEMO_KEY,
        check_embedding_ctx_length=False,
        max_retries=0,
        timeout=TIMEOUT,
    )
    vectors = embeddings.embed_documents(["a", "b"])
    assert len(vectors) == 2
    for vector in vectors:
        assert len(vector) == 16
        assert all(isinstance(x, float) and math.isfinite(x) for x in vector)
    assert vectors[0] != vectors[1]
    assert embeddings.embed_query("b") == vectors[1]


# ---------------------------------------------------------------- the Python openai SDK, HTTP


def sdk(demo: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo.base + "/v1", api_key=DEMO_KEY, max_retries=0)


def test_n_choices(demo: Proc) -> None:
    """n=3 gives three choices, indexed 0-2, each a whole reply."""
    completion = sdk(demo).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "three times"}], n=3
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert "You said: three times" in (choice.message.content or "")
        assert choice.finish_reason == "stop"


def test_json_mode_answers_a_json_object(demo: Proc) -> None:
    """response_format json_object: the content parses as a JSON object."""
    completion = sdk(demo).chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert isinstance(json.loads(content), dict)


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def test_azure_api_key_header_on_v1(demo: Proc) -> None:
    """Azure OpenAI's api-key header, alone, is a key for /v1 (and no header is a 401)."""
    url = demo.base + "/v1/chat/completions"
    resp = requests.post(url, json=CHAT, headers={"api-key": DEMO_KEY}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert "You said: hi" in resp.json()["choices"][0]["message"]["content"]
    assert requests.post(url, json=CHAT, timeout=TIMEOUT).status_code == 401
    wrong = {"api-key": "sk-wrong-key-000000"}
    assert requests.post(url, json=CHAT, headers=wrong, timeout=TIMEOUT).status_code == 401


def test_bearer_key_on_call_php(demo: Proc) -> None:
    """/api/call.php takes `Authorization: Bearer <key>` without X-API-Key, and answers in
    the contract's envelope."""
    url = demo.base + "/api/call.php"
    bearer = {"Authorization": f"Bearer {DEMO_KEY}"}
    resp = requests.post(url, json=CHAT, headers=bearer, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is True
    assert body["message"] == "请求成功"
    data = body["data"]
    assert "You said: hi" in data["response"]["choices"][0]["message"]["content"]
    assert data["usage"]["total_tokens"] > 0
    assert "daily_limits" in data
    wrong = {"Authorization": "Bearer sk-wrong-key-000000"}
    refused = requests.post(url, json=CHAT, headers=wrong, timeout=TIMEOUT)
    assert refused.status_code == 401
    assert refused.json()["success"] is False
