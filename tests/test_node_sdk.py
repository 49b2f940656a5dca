"""The openai package for Node (tests/node/, pinned by its package-lock.json) against real gateway
processes: the stream helper, embeddings as the SDK asks for them (base64) and as floats, a daily
limit's 429 at the SDK's default retries, the Responses API, and tool calls.

Each test runs one tests/node/*.mjs script with `node`; the script prints one JSON line of what
it saw (and of the HTTP requests it sent), and the test asserts on that. Without node or npm the
tests skip, except under CI (.ci/run sets CI), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest
from conftest import ROOT, Proc, users_yaml

NODE_DIR = ROOT / "tests" / "node"
DEMO_KEY = "your-api-key-here"  # users.yaml's demo_only user
ONCE_KEY = "sk-once-node-7c1d2e3f"  # a user with daily_request_limit 1
NPM_TIMEOUT = 300  # seconds for npm ci on a cold cache
SCRIPT_TIMEOUT = 60  # seconds for one script


def _unavailable(reason: str) -> None:
    """Skip, or under CI (where the tools must be there) fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


def _installed() -> bool:
    """Whether node_modules holds every package of the lock file at the locked version."""
    lock_path = NODE_DIR / "package-lock.json"
    if not lock_path.exists():
        return (NODE_DIR / "node_modules" / "openai" / "package.json").exists()
    packages = json.loads(lock_path.read_text())["packages"]
    for where, entry in packages.items():
        if not where.startswith("node_modules/"):
            continue  # "" is the project itself
        manifest = NODE_DIR / where / "package.json"
        if not manifest.exists():
            return False
        if json.loads(manifest.read_text()).get("version") != entry.get("version"):
            return False
    return True


@pytest.fixture(scope="session")
def node_sdk() -> str:
    """The path of `node`, with tests/node/node_modules installed from the lock file (npm ci;
    npm install if there is no lock) when it is missing or differs from the lock."""
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
    if missing:
        _unavailable(f"the Node SDK tests need {' and '.join(missing)} on PATH")
    assert node is not None and npm is not None
    # One install at a time, should several test sessions start at once.
    with filelock.FileLock(Path(tempfile.gettempdir()) / "gateway-tests-node-npm.lock"):
        if not _installed():
            command = "ci" if (NODE_DIR / "package-lock.json").exists() else "install"
            try:
                done = subprocess.run(
                    [npm, command, "--no-audit", "--no-fund", "--loglevel=error"],
                    cwd=NODE_DIR,
                    capture_output=True,
                    text=True,
                    timeout=NPM_TIMEOUT,
                    env={**os.environ, "npm_config_update_notifier": "false"},
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm {command} in {NODE_DIR} took over {NPM_TIMEOUT} s")
            if done.returncode != 0:
                pytest.fail(f"npm {command} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            assert _installed(), "npm finished but node_modules still differs from the lock"
    return node


async def run_script(node: str, script: str, base: str, key: str) -> dict[str, Any]:
    """Run tests/node/<script> against the gateway at `base`; its JSON result, which must not
    be an error."""
    proc = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / script),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GATEWAY_BASE_URL": base + "/v1", "GATEWAY_API_KEY": key},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCRIPT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{script} did not finish within {SCRIPT_TIMEOUT} s") from None
    lines = out.decode().strip().splitlines()
    assert lines, f"{script} printed nothing (exit {proc.returncode}):\n{err.decode()}"
    result = json.loads(lines[-1])
    assert "error" not in result, f"{script} failed: {json.dumps(result, ensure_ascii=False)}"
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{err.decode()}"
    return result


async def test_the_chat_stream_helper_collects_the_final_message(node_sdk: str, demo: Proc) -> None:
    """chat.completions.stream() needs the role in the first delta ("missing role for
    choice 0" without it) and assembles the whole message from the deltas."""
    result = await run_script(node_sdk, "chat_stream.mjs", demo.base, DEMO_KEY)
    message = result["message"]
    assert message["role"] == "assistant"
    assert message["content"]
    assert "You said: ping from node" in message["content"]
    assert len(result["deltas"]) > 1  # it did stream
    assert "".join(result["deltas"]) == message["content"]
    assert result["finish_reason"] == "stop"
    assert [r["body"].get("stream") for r in result["sent"]] == [True]


async def test_embeddings_as_the_sdk_asks_for_them_and_as_floats(node_sdk: str, demo: Proc) -> None:
    """At the SDK's default it asks for base64 and decodes the float32 itself; the vectors
    are one per input, in input order, and the same as with encoding_format "float"."""
    result = await run_script(node_sdk, "embeddings.mjs", demo.base, DEMO_KEY)
    bodies = [r["body"] for r in result["sent"]]
    assert [b["encoding_format"] for b in bodies[:2]] == ["base64", "float"]
    by_default = result["default"]
    as_floats = result["float"]
    singles = [one[0] for one in result["singles"]]
    for batch in (by_default, as_floats):
        assert [d["index"] for d in batch] == [0, 1, 2]
        for d in batch:
            vector = d["embedding"]
            assert len(vector) == 16
            assert all(isinstance(x, int | float) and math.isfinite(x) for x in vector)
            assert all(-0.5 <= x <= 0.5 for x in vector)
        vectors = [tuple(d["embedding"]) for d in batch]
        assert len(set(vectors)) == 3  # different inputs, different vectors
    # In input order: the batch's i-th vector is input i's own vector, embedded alone.
    assert [d["embedding"] for d in as_floats] == [s["embedding"] for s in singles]
    # The SDK's base64 decoding agrees with the floats, to float32 precision.
    for decoded, floats in zip(by_default, as_floats, strict=True):
        for x, y in zip(decoded["embedding"], floats["embedding"], strict=True):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7), (x, y)
    assert result["usage"]["total_tokens"] > 0


async def test_a_daily_limit_429_is_raised_at_once_at_default_retries(
    node_sdk: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """The second call of a user with daily_request_limit 1 is a RateLimitError within 2 s
    (x-should-retry: false), not a sleep of Retry-After (the rest of the day) and retries."""
    users = tmp_path / "users.yaml"
    users.write_text(users_yaml({"once": {"api_key": ONCE_KEY, "daily_request_limit": 1}}))
    gw = procs(
        [
            "--demo",
            "--host=127.0.0.1",
            f"--users-file={users}",
            f"--data-dir={tmp_path / 'data'}",
        ],
        tmp_path / "gateway.log",
    )
    await gw.ready()
    result = await run_script(node_sdk, "rate_limit.mjs", gw.base, ONCE_KEY)
    assert result["first"]
    assert result["max_retries"] > 0  # the SDK's default: retries are on
    assert result["outcome"] == "refused", result
    refused = result["refused"]
    assert refused["isRateLimitError"], refused
    assert refused["status"] == 429
    assert refused["headers"]["x-should-retry"] == "false"
    assert int(refused["headers"]["retry-after"]) > 0
    assert refused["headers"]["x-ratelimit-remaining-requests"] == "0"
    assert result["seconds"] < 2
    assert len(result["sent"]) == 2  # no retry of the refused call


async def test_the_responses_api_created_and_streamed(node_sdk: str, demo: Proc) -> None:
    """responses.create() and responses.stream(): output_text and usage, and a stream of
    the Responses API's events from response.created to response.completed."""
    result = await run_script(node_sdk, "responses.mjs", demo.base, DEMO_KEY)
    created, streamed = result["created"], result["streamed"]
    assert created["status"] == streamed["status"] == "completed"
    assert "You said: hello responses" in created["output_text"]
    assert "You said: hello stream" in streamed["output_text"]
    assert streamed["deltas"] == streamed["output_text"]
    assert streamed["types"][0] == "response.created"
    assert streamed["types"][-1] == "response.completed"
    assert streamed["types"].count("response.output_text.delta") > 1
    for usage in (created["usage"], streamed["usage"]):
        assert usage["input_tokens"] > 0
        assert usage["output_tokens"] > 0
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_a_tool_call_with_arguments_of_the_tools_schema(node_sdk: str, demo: Proc) -> None:
    """With a function tool offered, the demo calls it: finish_reason tool_calls and
    arguments that parse as JSON with the schema's required keys, of their types."""
    result = await run_script(node_sdk, "tools.mjs", demo.base, DEMO_KEY)
    assert result["finish_reason"] == "tool_calls"
    calls = result["message"]["tool_calls"]
    assert len(calls) == 1
    assert calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_forecast"
    arguments = json.loads(calls[0]["function"]["arguments"])
    schema = result["parameters"]
    assert isinstance(arguments, dict)
    assert set(schema["required"]) <= set(arguments)
    assert set(arguments) <= set(schema["properties"])  # additionalProperties: false
    assert isinstance(arguments["city"], str)
    assert type(arguments["days"]) is int
    assert arguments["days"] >= schema["properties"]["days"]["minimum"]
    assert arguments["unit"] in schema["properties"]["unit"]["enum"]
    if "hourly" in arguments:
        assert type(arguments["hourly"]) is bool
