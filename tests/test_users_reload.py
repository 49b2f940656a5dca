"""users.yaml: validation, hot reload within seconds, broken edits keep the last good users."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re

import pytest
import yaml
from conftest import ALICE_KEY, BOB_KEY, ROOT, VALID, Env

import gateway


async def wait_for_status(client, key: str, want: int, seconds: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    status = None
    while asyncio.get_running_loop().time() < deadline:
        status = (await client.call(VALID, key=key))[0]
        if status == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"status stayed {status}, wanted {want}")


async def test_added_disabled_and_removed_users_apply_without_restart(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY}})
    client = await env.start()
    assert (await client.call(VALID, key=BOB_KEY))[0] == 401
    env.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": BOB_KEY}})
    await wait_for_status(client, BOB_KEY, 200)
    env.write_users(
        {"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": BOB_KEY, "enabled": False}}
    )
    await wait_for_status(client, BOB_KEY, 401)
    env.write_users({"bob": {"api_key": BOB_KEY}})
    await wait_for_status(client, ALICE_KEY, 401)
    assert (await client.status())["stats"]["total_users"] == 1


async def test_broken_edit_is_logged_and_last_good_users_stay(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY}})
    client = await env.start()
    with caplog.at_level(logging.ERROR, logger="gateway"):
        env.users_file.write_text("users:\n  alice: [unclosed\n")
        await asyncio.sleep(0.5)
    assert any("not reloaded, keeping 1 users" in r.message for r in caplog.records)
    assert (await client.call(VALID))[0] == 200
    # and the next good edit is picked up
    env.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": BOB_KEY}})
    await wait_for_status(client, BOB_KEY, 200)


BROKEN = [
    ("users: [1, 2]", "'users' must be a mapping"),
    ("defaults: {daily_request_limit: -1}", "whole number >= 0"),
    ("defaults: {daily_request_limit: 1.5}", "whole number >= 0"),
    ("defaults: {daily_request_limt: 5}", "unknown keys in defaults"),
    ("users: {a: {api_key: short}}", "8+ characters"),
    ("users: {a: {api_key_sha256: abc}}", "64 hex"),
    ("users: {a: {}}", "exactly one of api_key or api_key_sha256"),
    ("users: {a: {api_key: sk-aaaaaaaa, daily_token_limit: yes}}", "whole number"),
    ("users: {a: {api_key: sk-aaaaaaaa, enabeld: false}}", "unknown keys"),
    ("users: {a: {api_key: sk-aaaaaaaa}, b: {api_key: sk-aaaaaaaa}}", "same key"),
    ("users:\n  a: {api_key: sk-aaaaaaaa}\n  a: {api_key: sk-bbbbbbbb}\n", "duplicate key 'a'"),
    ('users: {"bad\\"name": {api_key: sk-aaaaaaaa}}', "user name"),
    ("- a list", "top level must be a mapping"),
    ("extra: 1", "unknown top-level keys"),
]


@pytest.mark.parametrize(("text", "error"), BROKEN)
def test_invalid_users_files_are_refused_with_a_reason(text: str, error: str) -> None:
    with pytest.raises(gateway.ConfigError, match=re.escape(error)):
        gateway.parse_users(text)


def test_sha256_key_and_defaults() -> None:
    digest = hashlib.sha256(b"sk-some-key-123").hexdigest()
    text = yaml.safe_dump(
        {
            "defaults": {"daily_request_limit": 7, "daily_token_limit": 70},
            "users": {"a": {"api_key_sha256": digest.upper()}, "b": {"api_key": "sk-bbbbbbbb"}},
        }
    )
    users = gateway.parse_users(text)
    assert users["a"].daily_request_limit == 7 and users["a"].daily_token_limit == 70
    directory = gateway.UserDirectory("unused")
    directory.by_name = users
    directory._by_digest = {u.key_sha256: u for u in users.values()}
    assert directory.authenticate("sk-some-key-123") == users["a"]
    assert directory.authenticate("sk-some-key-124") is None


def test_demo_only_users_exist_only_in_demo_mode() -> None:
    text = "users: {demo: {api_key: your-api-key-here, demo_only: true}}"
    assert gateway.parse_users(text) == {}
    assert list(gateway.parse_users(text, demo=True)) == ["demo"]


def test_shipped_users_yaml_is_valid() -> None:
    text = (ROOT / "users.yaml").read_text()
    assert list(gateway.parse_users(text, demo=True)) == ["demo"]
    assert gateway.parse_users(text) == {}


async def test_missing_users_file_stops_start_up(env: Env) -> None:
    gw = gateway.Gateway(env.config(users_file=str(env.tmp / "nope.yaml")))
    with pytest.raises(gateway.ConfigError, match="cannot read"):
        await gw.start()
