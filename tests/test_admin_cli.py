"""`python gateway.py user …` / `usage …`: users.yaml edited in place, against a running gateway."""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
from conftest import ALICE_KEY, KEY_ENV, ROOT, Env, post, proc_args

import gateway

COMMENTED = """\
# Team users — edited by hand and by `gateway.py user`.
defaults:
  daily_request_limit: 50   # per user per day
  daily_token_limit: 100000

x-base: &base
  daily_token_limit: 5000

users:
  # the first user
  alice:
    api_key: {alice}   # plain key, kept as written
    <<: *base

  carol: {{api_key_sha256: {carol}, enabled: true}}
# trailing comment
"""


def commented(tmp: Path) -> Path:
    path = tmp / "users.yaml"
    path.write_text(
        COMMENTED.format(alice=ALICE_KEY, carol=hashlib.sha256(b"carol-key-123").hexdigest())
    )
    return path


async def cli(e: Env | Path, *args: str) -> tuple[int, str, str]:
    """Run a command the way an admin does; returns (exit status, stdout, stderr)."""
    if isinstance(e, Env):
        where = [f"--users-file={e.users_file}", f"--data-dir={e.data_dir}"]
    else:
        where = [f"--users-file={e / 'users.yaml'}", f"--data-dir={e / 'data'}"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "gateway.py"),
        *args,
        *where,
        "--timezone=Asia/Shanghai",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- editing users.yaml


async def test_add_keeps_the_file_as_written_and_stores_only_a_digest(tmp_path: Path) -> None:
    before = commented(tmp_path).read_text()
    code, out, err = await cli(tmp_path, "user", "add", "dave", "--requests", "7")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("sk-") and len(key) >= 3 + 43  # 32 random bytes, URL-safe base64
    assert key not in err
    after = (tmp_path / "users.yaml").read_text()
    assert key not in after
    # Every original line is still there, in order; the new lines come after alice's entry.
    assert after.startswith(before.split("\n  carol:")[0].rstrip("\n").rsplit("\n", 1)[0])
    for line in before.splitlines():
        assert line in after.splitlines()
    users = gateway.parse_users(after)
    assert users["dave"].key_sha256 == hashlib.sha256(key.encode()).digest()
    assert users["dave"].daily_request_limit == 7
    assert users["dave"].daily_token_limit == 100000  # defaults still apply
    assert users["alice"].daily_token_limit == 5000  # the merge key still applies


async def test_edits_touch_only_their_own_values(tmp_path: Path) -> None:
    path = commented(tmp_path)
    before = path.read_text().splitlines()
    assert (await cli(tmp_path, "user", "disable", "carol"))[0] == 0
    assert (await cli(tmp_path, "user", "limits", "alice", "--requests", "9"))[0] == 0
    code, out, _ = await cli(tmp_path, "user", "rotate", "alice")
    assert code == 0
    after = path.read_text().splitlines()
    diff = list(difflib.ndiff(before, after))
    removed = [d[2:] for d in diff if d.startswith("- ")]
    added = [d[2:] for d in diff if d.startswith("+ ")]
    # alice's key line became a digest (its comment kept), carol's flow mapping got the flag,
    # and alice's entry got one new line; nothing else moved.
    assert removed == [before[11], before[14]]
    digest = hashlib.sha256(out.strip().encode()).hexdigest()
    assert added == [
        f"    api_key_sha256: {digest}   # plain key, kept as written",
        "    daily_request_limit: 9",
        before[14].replace("enabled: true", "enabled: false"),
    ]
    users = gateway.parse_users(path.read_text())
    assert not users["carol"].enabled
    assert users["alice"].daily_request_limit == 9
    assert users["alice"].daily_token_limit == 5000
    assert (await cli(tmp_path, "user", "enable", "carol"))[0] == 0
    assert gateway.parse_users(path.read_text())["carol"].enabled


@pytest.mark.slow
async def test_errors_have_exit_codes_and_change_nothing(tmp_path: Path) -> None:
    path = commented(tmp_path)
    original = path.read_text()
    code, _, err = await cli(tmp_path, "user", "add", "alice")
    assert (code, "already exists" in err) == (1, True)
    for args in (("disable", "nobody"), ("rotate", "nobody"), ("reset", "nobody"), ("remove", "x")):
        code, _, err = await cli(tmp_path, "user", *args)
        assert (code, f"no user '{args[1]}'" in err) == (1, True), (args, err)
    code, _, err = await cli(tmp_path, "user", "limits", "alice")
    assert code == 2 and "--requests" in err
    code, _, err = await cli(tmp_path, "user", "limits", "alice", "--requests", "-1")
    assert code == 2 and ">= 0" in err
    code, _, err = await cli(tmp_path, "user", "add", 'bad"name')
    assert code == 2 and "user name" in err
    assert (await cli(tmp_path, "usage", "--date", "26-11-2026"))[0] == 2
    assert (await cli(tmp_path, "user", "frobnicate"))[0] == 2
    assert path.read_text() == original
    path.write_text(original + "  bad: [\n")
    code, _, err = await cli(tmp_path, "user", "add", "erin")
    assert code == 2 and "not valid YAML" in err
    assert path.read_text() == original + "  bad: [\n"  # a broken file is not touched


@pytest.mark.slow
async def test_concurrent_adds_are_all_kept(tmp_path: Path) -> None:
    commented(tmp_path)
    results = await asyncio.gather(*(cli(tmp_path, "user", "add", f"u{n}") for n in range(12)))
    assert [code for code, _, _ in results] == [0] * 12
    users = gateway.parse_users((tmp_path / "users.yaml").read_text())
    for n, (_, out, _) in enumerate(results):
        assert users[f"u{n}"].key_sha256 == hashlib.sha256(out.strip().encode()).digest()


async def test_add_to_a_file_without_users(tmp_path: Path) -> None:
    (tmp_path / "users.yaml").write_text("defaults:\n  daily_request_limit: 3\n")
    code, _out, _ = await cli(tmp_path, "user", "add", "first user")
    assert code == 0
    users = gateway.parse_users((tmp_path / "users.yaml").read_text())
    assert users["first user"].daily_request_limit == 3


# ---------------------------------------------------------------- against a running gateway


@pytest.mark.slow
async def test_round_trip_against_a_running_gateway(penv: Env, procs, tmp_path: Path) -> None:
    penv.write_users({"alice": {"api_key": ALICE_KEY}})
    gw = procs(proc_args(penv), tmp_path / "gw.log", KEY_ENV)
    await gw.ready()
    http = penv.http

    code, out, err = await cli(penv, "user", "add", "dave", "--requests", "3", "--tokens", "1000")
    assert code == 0, err
    key = out.strip()
    # The printed key works without a restart.
    await eventually(lambda: _key_is(http, gw.base, key, 200))
    assert (await post(http, gw.base, key))[0] == 200

    assert (await cli(penv, "user", "disable", "dave"))[0] == 0
    await eventually(lambda: _key_is(http, gw.base, key, 401))
    assert (await post(http, gw.base, key))[0] == 401
    assert (await cli(penv, "user", "enable", "dave"))[0] == 0
    await eventually(lambda: _key_is(http, gw.base, key, 200))
    assert [(await post(http, gw.base, key))[0] for _ in range(2)] == [200, 200]
    code, body = await post(http, gw.base, key)
    assert code == 429 and body["data"]["daily_request_count"] == 3

    code, out, _ = await cli(penv, "user", "list", "--format", "json")
    dave = next(u for u in json.loads(out) if u["name"] == "dave")
    assert (dave["requests_today"], dave["tokens_today"], dave["requests_left"]) == (3, 45, 0)

    code, out, _ = await cli(penv, "user", "reset", "dave")
    assert code == 0 and "were 3 requests, 45 tokens" in out
    code, out, _ = await cli(penv, "user", "list", "--format", "json")
    dave = next(u for u in json.loads(out) if u["name"] == "dave")
    assert (dave["requests_today"], dave["tokens_today"]) == (0, 0)
    # The running gateway sees the reset at once: three more calls, then 429 again.
    codes = [(await post(http, gw.base, key))[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429]

    code, new_key, _ = await cli(penv, "user", "rotate", "dave")
    new_key = new_key.strip()
    await eventually(lambda: _key_is(http, gw.base, key, 401))
    assert (await post(http, gw.base, key))[0] == 401
    assert (await post(http, gw.base, new_key))[0] == 429  # same user, same counters
    assert (await cli(penv, "user", "limits", "dave", "--requests", "7"))[0] == 0
    await eventually(lambda: _key_is(http, gw.base, new_key, 200, limit=7))
    assert (await post(http, gw.base, new_key))[0] == 200

    # usage counts what was used, resets included: 3 + 3 + 1 calls of 15 tokens.
    code, out, _ = await cli(penv, "usage", "--format", "json", "--user", "dave")
    assert [(r["user"], r["requests"], r["tokens"]) for r in json.loads(out)] == [("dave", 7, 105)]
    code, out, _ = await cli(penv, "usage", "--format", "csv", "--days", "3")
    lines = out.strip().splitlines()
    # cost: 0.0, since no prices are set (the call log prices calls; see test_cost.py)
    assert lines[0] == "date,user,requests,tokens,cost" and lines[-1].endswith(",dave,7,105,0.0")
    # …and it agrees with the call log, line for line.
    logged = [json.loads(x) for x in _call_log(penv).read_text().splitlines()]
    charged = [x for x in logged if x["user"] == "dave" and x["status"] == 200]
    assert (len(charged), sum(x["total_tokens"] for x in charged)) == (7, 105)
    # Removed: the key stops working; the usage records stay.
    assert (await cli(penv, "user", "remove", "dave"))[0] == 0
    await eventually(lambda: _key_is(http, gw.base, new_key, 401))
    code, out, _ = await cli(penv, "usage", "--format", "json")
    assert [(r["user"], r["requests"]) for r in json.loads(out)] == [("dave", 7)]
    log_text = gw.log_path.read_text()
    # One process all along; it reloaded after add, disable, enable, rotate, limits, remove.
    assert log_text.count("gateway listening") == 1
    assert log_text.count("users file reloaded") == 6
    for secret in (key, new_key):
        assert secret not in gw.log_path.read_text()
        assert secret not in penv.users_file.read_text()


def _call_log(e: Env) -> Path:
    return next((e.data_dir / "calls").glob("*.jsonl"))


async def _key_is(http, base: str, key: str, want: int, limit: int | None = None) -> bool:
    """Whether the gateway answers this key with `want` (and has this daily request limit),
    probed without using any quota."""
    resp = await http.fetch(
        base + "/v1/models", headers={"Authorization": f"Bearer {key}"}, raise_error=False
    )
    if limit is not None and resp.headers.get("x-ratelimit-limit-requests") != str(limit):
        return False
    return resp.code == want


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
async def test_usage_formats_on_an_empty_data_dir(tmp_path: Path, fmt: str) -> None:
    commented(tmp_path)
    code, out, err = await cli(tmp_path, "usage", "--days", "14", "--format", fmt)
    assert code == 0, err
    assert out.strip() in (
        "date  user  requests  tokens  cost",
        "date,user,requests,tokens,cost",
        "[]",
    )
    assert not (tmp_path / "data").exists()  # reading creates nothing


@pytest.mark.slow
async def test_reset_among_waves_of_calls_on_two_processes(
    penv: Env, procs, tmp_path: Path
) -> None:
    """A reset lands among the calls: whatever it frees, every 200 is counted once everywhere."""
    penv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 20}})
    penv.upstream.delay = 0.02
    a = procs(proc_args(penv), tmp_path / "a.log", KEY_ENV)
    b = procs(proc_args(penv), tmp_path / "b.log", KEY_ENV)
    await asyncio.gather(a.ready(), b.ready())

    async def waves() -> list[int]:
        """10 waves of 20 calls at once, 0.15 s apart; the reset lands among them."""
        codes: list[int] = []
        for _ in range(10):
            calls = [post(penv.http, (a if i % 2 else b).base) for i in range(20)]
            codes += [code for code, _ in await asyncio.gather(*calls)]
            await asyncio.sleep(0.15)
        return codes

    codes, (reset_code, _, _) = await asyncio.gather(waves(), cli(penv, "user", "reset", "alice"))
    assert reset_code == 0
    ok = codes.count(200)
    assert codes.count(200) + codes.count(429) == 200
    assert codes[:20] == [200] * 20 and codes[-20:] == [429] * 20
    assert 20 < ok <= 40  # the reset gave back at most one day's worth
    _, out, _ = await cli(penv, "usage", "--format", "json")
    assert json.loads(out)[0]["requests"] == ok
    logged = [json.loads(x) for x in _call_log(penv).read_text().splitlines()]
    assert len(logged) == 200
    assert sum(1 for x in logged if x["status"] == 200) == ok
    _, out, _ = await cli(penv, "user", "list", "--format", "json")
    (alice,) = json.loads(out)
    # What counts against the limit now is exactly what was charged after the reset record.
    (journal,) = penv.data_dir.glob("*.jsonl")
    records = [json.loads(x) for x in journal.read_text().split("\n") if x]
    kinds = [r["k"] for r in records]
    assert kinds.count("z") == 1
    after = kinds[kinds.index("z") :].count("s")
    assert alice["requests_today"] == after <= 20
    assert kinds.count("s") == ok


# ---------------------------------------------------------------- policy settings


async def test_policy_sets_and_unsets_settings_and_is_audited(tmp_path: Path) -> None:
    path = commented(tmp_path)
    path.write_text(path.read_text().replace("users:\n", "groups:\n  interns: {rpm: 10}\nusers:\n"))
    before = path.read_text().splitlines()
    code, out, err = await cli(
        tmp_path, "user", "policy", "alice", "--rpm", "30", "--tpm", "9000",
        "--models", "gpt-4o*, claude-*", "--max-concurrency", "2", "--expires", "2027-01-31",
        "--allow-ips", "10.0.0.0/8,127.0.0.1", "--weight", "3", "--token-policy", "strict",
    )  # fmt: skip
    assert code == 0, err
    assert "rpm 30" in out and "token_policy strict" in out
    alice = gateway.parse_users(path.read_text())["alice"]
    p = alice.policy
    assert (p.rpm, p.tpm, p.max_concurrency, p.weight, p.token_policy) == (30, 9000, 2, 3, "strict")
    assert p.models == ("gpt-4o*", "claude-*")
    assert str(p.expires) == "2027-01-31"
    assert [str(n) for n in p.allow_ips] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert alice.daily_token_limit == 5000  # the merge key still applies
    after = path.read_text().splitlines()
    assert [line for line in before if line not in after] == []  # only lines were added
    # carol is a flow mapping: the group goes in, her own rpm comes out again
    assert (await cli(tmp_path, "user", "policy", "carol", "--group", "interns", "--rpm", "4"))[
        0
    ] == 0
    assert gateway.parse_users(path.read_text())["carol"].policy.rpm == 4
    code, out, err = await cli(tmp_path, "user", "policy", "carol", "--unset", "rpm")
    assert code == 0, err
    carol = gateway.parse_users(path.read_text())["carol"]
    assert (carol.group, carol.policy.rpm) == ("interns", 10)  # the group's applies again
    code, _, err = await cli(
        tmp_path, "user", "policy", "alice", "--unset", "models", "--unset", "allow_ips"
    )
    assert code == 0, err
    alice = gateway.parse_users(path.read_text())["alice"]
    assert alice.policy.models == ("*",) and alice.policy.allow_ips == ()
    assert alice.policy.rpm == 30
    lines = [
        json.loads(line)
        for f in sorted((tmp_path / "data" / "audit").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert [(x["action"], x["target"], x["fields"]) for x in lines] == [
        (
            "user policy",
            "alice",
            sorted(
                [
                    "rpm",
                    "tpm",
                    "models",
                    "max_concurrency",
                    "expires",
                    "allow_ips",
                    "weight",
                    "token_policy",
                ]
            ),
        ),
        ("user policy", "carol", ["group", "rpm"]),
        ("user policy", "carol", ["rpm"]),
        ("user policy", "alice", ["allow_ips", "models"]),
    ]


@pytest.mark.slow
async def test_policy_errors_change_nothing(tmp_path: Path) -> None:
    path = commented(tmp_path)
    original = path.read_text()
    for args, code, words in (
        (("nobody", "--rpm", "1"), 1, "no user 'nobody'"),
        (("alice",), 2, "give a setting"),
        (("alice", "--rpm", "-1"), 2, ">= 0"),
        (("alice", "--weight", "0"), 2, "1 to 1000"),
        (("alice", "--expires", "2027-02-30"), 2, "YYYY-MM-DD"),
        (("alice", "--allow-ips", "10.0.0.300"), 2, "not an address"),
        (("alice", "--models", "gpt-[4"), 2, "unbalanced"),
        (("alice", "--group", "nobody"), 2, "no group"),
        (("alice", "--rpm", "3", "--unset", "rpm"), 2, "set and unset"),
        (("alice", "--unset", "api_key"), 2, "invalid choice"),
        (("alice", "--token-policy", "lax"), 2, "invalid choice"),
    ):
        got, _, err = await cli(tmp_path, "user", "policy", *args)
        assert (got, words in err) == (code, True), (args, err)
    assert path.read_text() == original


async def test_a_running_gateway_applies_a_policy_change(senv: Env) -> None:
    client = await senv.start()
    for _ in range(3):
        assert (await client.call())[0] == 200
    code, _, err = await cli(senv, "user", "policy", "alice", "--rpm", "3")
    assert code == 0, err

    async def refused() -> bool:
        return (await client.call())[0] == 429

    await eventually(refused)
    code, _, err = await cli(senv, "user", "policy", "alice", "--unset", "rpm")
    assert code == 0, err

    async def admitted() -> bool:
        return (await client.call())[0] == 200

    await eventually(admitted)
