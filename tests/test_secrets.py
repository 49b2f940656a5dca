"""No key, the users' or the upstream's, ever appears in logs, responses or data/."""

from __future__ import annotations

import json
import logging
import stat

import pytest
from conftest import ALICE_KEY, ALL_SECRETS, UPSTREAM_KEY, VALID, Env, data_text

WRONG_KEY = "sk-wrong-CANARY-123456789"


async def test_no_key_in_logs_responses_or_data(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        client = await env.start()
        for kwargs in (
            {},
            {"key": WRONG_KEY},
            {"raw": b"{not json"},
            {"path": f"/api/call.php?api_key={ALICE_KEY}"},
            {"path": f"/nothing?key={UPSTREAM_KEY}"},
        ):
            status, doc, headers = await client.call(VALID, **kwargs)
            seen.append(json.dumps(doc) + json.dumps(dict(headers)))
        # an upstream error that echoes the team's key
        env.upstream.status = 401
        env.upstream.body = json.dumps({"error": {"message": f"bad key {UPSTREAM_KEY}"}}).encode()
        status, doc, headers = await client.call(VALID)
        assert status == 502
        seen.append(json.dumps(doc))
        seen.append(json.dumps(await client.status()))
        await env.stop()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /api/call.php" in logs  # the access log ran and was captured
    stored = data_text(env.data_dir)
    assert "alice" in stored  # the data dir holds usage, by user name
    for secret in (*ALL_SECRETS, WRONG_KEY):
        assert secret not in logs
        assert secret not in stored
        for text in seen:
            assert secret not in text


async def test_data_files_are_private(env: Env) -> None:
    client = await env.start()
    assert (await client.call(VALID))[0] == 200
    await env.stop()
    files = [p for p in env.data_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert len(files) == 3  # counters: journal and snapshot; the call log
    assert stat.S_IMODE((env.data_dir / "calls").stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
