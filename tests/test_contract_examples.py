"""The API contract's own curl, Python and JavaScript examples, run as written against --demo.

tests/contract/ holds the examples verbatim; only the placeholder host is pointed at the demo.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import tornado.httpclient
from conftest import Proc

EXAMPLES = Path(__file__).parent / "contract"


async def run_example(demo: Proc, tmp_path: Path, name: str, argv: list[str]) -> str:
    text = (EXAMPLES / name).read_text().replace("https://your-domain", demo.base)
    script = tmp_path / name
    script.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_curl_example(demo: Proc, tmp_path: Path) -> None:
    out = await run_example(demo, tmp_path, "call.sh", ["sh"])
    doc = json.loads(out)
    assert doc["success"] is True
    assert doc["message"] == "请求成功"
    assert "Hello!" in doc["data"]["response"]["choices"][0]["message"]["content"]
    assert doc["data"]["daily_limits"]["requests"]["used"] == 1


async def test_python_example(demo: Proc, tmp_path: Path) -> None:
    out = await run_example(demo, tmp_path, "call.py", [sys.executable])
    assert out.startswith("{'success': True, 'message': '请求成功'")
    assert "'daily_limits'" in out


async def test_javascript_example(demo: Proc, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is required in CI for the contract's JavaScript example")
        pytest.skip("node is not installed")
    out = await run_example(demo, tmp_path, "call.mjs", [node])
    assert "success: true" in out
    assert "message: '请求成功'" in out


async def test_demo_status_and_shipped_demo_user(demo: Proc) -> None:
    http = tornado.httpclient.AsyncHTTPClient()
    resp = await http.fetch(demo.base + "/api/status.php")
    data = json.loads(resp.body)["data"]
    assert data["status"] == "running"
    assert data["api_key_configured"] is True
    assert data["stats"]["total_users"] == 1  # the shipped users.yaml's demo user
