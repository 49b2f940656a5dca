"""The README's OpenAI SDK snippets (Python and Node) run as written against --demo."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Proc

import gateway

README = (ROOT / "README.md").read_text()


def snippet(language: str, starts: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if block.startswith(starts):
            return block
    raise AssertionError(f"no {language} snippet starting with {starts!r} in README.md")


async def run(argv: list[str], cwd: Path, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_python_sdk_snippet(demo: Proc, tmp_path: Path) -> None:
    code = snippet("python", "from openai").replace("http://127.0.0.1:8000", demo.base)
    (tmp_path / "snippet.py").write_text(code)
    out = await run([sys.executable, "snippet.py"], tmp_path)
    assert out.count("You said: Hello!") == 2  # once whole, once streamed


async def test_anthropic_sdk_snippet(demo: Proc, tmp_path: Path) -> None:
    """The Messages API example runs as written, and Claude Code's two variables name the
    gateway's base URL without /v1 and a user's key."""
    code = snippet("python", "import anthropic").replace("http://127.0.0.1:8000", demo.base)
    (tmp_path / "snippet.py").write_text(code)
    out = await run([sys.executable, "snippet.py"], tmp_path)
    assert "You said: Hello!" in out
    claude = snippet("sh", "export ANTHROPIC_BASE_URL")
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8000\n" in claude
    assert "ANTHROPIC_AUTH_TOKEN=your-api-key-here" in claude


async def test_responses_snippet(demo: Proc, tmp_path: Path) -> None:
    setup = snippet("python", "from openai").split("reply =")[0]
    code = setup + snippet("python", "response = client.responses")
    (tmp_path / "snippet.py").write_text(code.replace("http://127.0.0.1:8000", demo.base))
    out = await run([sys.executable, "snippet.py"], tmp_path)
    assert "You said: Hello!" in out


@pytest.mark.slow
async def test_node_sdk_snippet(demo: Proc, tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI for the README's Node snippet")
        pytest.skip("node/npm not installed")
    await run([npm, "install", "--silent", "--no-audit", "--no-fund", "openai@7"], tmp_path, 240)
    code = snippet("javascript", "import OpenAI").replace("http://127.0.0.1:8000", demo.base)
    (tmp_path / "snippet.mjs").write_text(code)
    out = await run(["node", "snippet.mjs"], tmp_path)
    assert "You said: Hello!" in out


@pytest.mark.slow
async def test_operating_commands_run_as_written(tmp_path: Path) -> None:
    block = snippet("sh", "python3 gateway.py user add")
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert len(commands) == 10
    (tmp_path / "users.yaml").write_text((ROOT / "users.yaml").read_text())
    env = {
        "GATEWAY_USERS_FILE": str(tmp_path / "users.yaml"),
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
    }
    for argv in commands:
        assert argv[:2] == ["python3", "gateway.py"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "gateway.py"),
            *argv[2:],
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, (argv, err.decode())
    # alice was added, changed in every way, and removed at the end.
    text = (tmp_path / "users.yaml").read_text()
    assert "alice" not in gateway.parse_users(text, demo=True)
    assert text.count("api_key_sha256:") >= 1 and "\n  alice:" not in text
