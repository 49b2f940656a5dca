"""The audit trail: every change an administrator makes appends one line to
data/audit/YYYY-MM-DD.jsonl (time, actor, action, target, fields; never a key), from the
`user` commands, the dashboard, and reloads of a changed users.yaml or upstreams.yaml; the
dashboard shows the latest entries and `python gateway.py audit` prints them."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

from conftest import ALICE_KEY, ROOT, Env, users_yaml
from test_routing import ADMIN_KEY, Admin

GATEWAY = str(ROOT / "gateway.py")


def entries(data_dir: Path) -> list[dict]:
    out = []
    for path in sorted((data_dir / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def command(tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GATEWAY_USERS_FILE": str(tmp / "users.yaml"),
        "GATEWAY_DATA_DIR": str(tmp / "data"),
    }
    return subprocess.run(
        [sys.executable, GATEWAY, *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_user_commands_are_recorded_with_the_os_user_and_never_a_key(tmp_path: Path) -> None:
    (tmp_path / "users.yaml").write_text(users_yaml({"alice": {"api_key": ALICE_KEY}}))
    added = command(tmp_path, "user", "add", "bob", "--requests", "5")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    rotated = command(tmp_path, "user", "rotate", "bob")
    assert rotated.returncode == 0
    for argv in (("user", "limits", "bob", "--tokens", "99"), ("user", "disable", "bob")):
        assert command(tmp_path, *argv).returncode == 0
    assert command(tmp_path, "user", "list").returncode == 0  # a read: not recorded
    assert command(tmp_path, "user", "remove", "nobody").returncode == 1  # failed: not recorded
    got = entries(tmp_path / "data")
    assert [(e["action"], e["target"]) for e in got] == [
        ("user add", "bob"),
        ("user rotate", "bob"),
        ("user limits", "bob"),
        ("user disable", "bob"),
    ]
    assert got[0]["fields"] == ["daily_request_limit", "api_key"]
    assert got[1]["fields"] == ["api_key"] and got[2]["fields"] == ["daily_token_limit"]
    assert all(e["actor"].startswith(pwd.getpwuid(os.geteuid()).pw_name) for e in got)
    text = (
        (tmp_path / "data" / "audit").read_bytes()
        if False
        else "".join(p.read_text() for p in (tmp_path / "data" / "audit").iterdir())
    )
    assert key not in text and rotated.stdout.strip() not in text
    assert ALICE_KEY not in text
    printed = command(tmp_path, "audit", "--format", "json")
    assert printed.returncode == 0
    rows = json.loads(printed.stdout)
    assert [r["action"] for r in rows] == ["user disable", "user limits", "user rotate", "user add"]


async def test_reloads_and_dashboard_actions_are_recorded(senv: Env) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": "sk-bob-key-000001"}})
    client = await senv.start(admin_key=ADMIN_KEY)
    # A hand edit: bob's limit changes and his key too, carol arrives, alice goes.
    senv.users_file.write_text(
        users_yaml(
            {
                "bob": {"api_key": "sk-bob-key-000002", "daily_request_limit": 7},
                "carol": {"api_key": "sk-carol-key-0003"},
            }
        )
    )
    for _ in range(100):
        if "carol" in senv.gateways[0].users.by_name:
            break
        await asyncio.sleep(0.05)
    reloads = [e for e in entries(senv.data_dir) if e["actor"] == "file"]
    assert {(e["action"], e["target"]) for e in reloads} == {
        ("user added", "carol"),
        ("user removed", "alice"),
        ("user changed", "bob"),
    }
    bob = next(e for e in reloads if e["target"] == "bob")
    assert sorted(bob["fields"]) == ["api_key", "daily_request_limit"]
    # A dashboard action, by a session.
    admin = Admin(client)
    await admin.login()
    code, _ = await admin.post_json("/admin/api/users/reset", {"name": "bob"})
    assert code == 200
    last = entries(senv.data_dir)[-1]
    assert last["action"] == "user reset" and last["target"] == "bob"
    assert last["actor"].startswith("dashboard session ")
    # The dashboard shows the latest first.
    code, body = await admin.request("/admin/api/state")
    assert code == 200
    shown = json.loads(body)["data"]["audit"]
    assert shown[0]["action"] == "user reset"
    text = "".join(p.read_text() for p in (senv.data_dir / "audit").iterdir())
    for secret in ("sk-bob-key-000001", "sk-bob-key-000002", "sk-carol-key-0003", ADMIN_KEY):
        assert secret not in text


async def test_an_upstreams_reload_is_recorded_without_keys(senv: Env) -> None:
    path = senv.tmp / "upstreams.yaml"
    url = senv.upstream.url
    path.write_text(f"upstreams:\n  a: {{base_url: '{url}', api_key: sk-up-key-A-0001}}\n")
    await senv.start(upstreams_file=str(path))
    path.write_text(
        f"upstreams:\n  a: {{base_url: '{url}', api_key: sk-up-key-A-0002, weight: 3}}\n"
        f"  b: {{base_url: '{url}', api_key: sk-up-key-B-0001}}\nretries: 1\n"
    )
    for _ in range(100):
        if "b" in senv.gateways[0].service.router.channels:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.05)
    got = {(e["action"], e["target"]): e for e in entries(senv.data_dir) if e["actor"] == "file"}
    assert set(got) == {
        ("upstream added", "b"),
        ("upstream changed", "a"),
        ("routing changed", "upstreams.yaml"),
    }
    assert sorted(got[("upstream changed", "a")]["fields"]) == ["keys", "weight"]
    assert got[("routing changed", "upstreams.yaml")]["fields"] == ["retries"]
    text = "".join(p.read_text() for p in (senv.data_dir / "audit").iterdir())
    assert "sk-up-key" not in text
