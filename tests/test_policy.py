"""Per-user policy (users.yaml: defaults < group < user): allowed models, rpm, tpm,
max_concurrency, expires, allow_ips, weight, token_policy; fair share of the workers.

Every refusal costs nothing and reaches no upstream; rpm, tpm and concurrency are exact under
concurrency and across processes on one data dir; the token policies' overshoot is measured
(printed with -s: the README quotes it)."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import math
import random
import time
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
import yaml
from conftest import KEY_ENV, Client, Env, FakeUpstream, post, proc_args
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import gateway

SHANGHAI = ZoneInfo("Asia/Shanghai")
CALL = "/api/call.php"
CHAT = "/v1/chat/completions"
ROUTES = (CALL, CHAT)

# The answers of the table: status, message, machine code.
MODEL = (403, "无权使用该模型", "model_not_allowed")
RPM = (429, "每分钟请求次数已达上限", "rpm_limit_exceeded")
TPM = (429, "每分钟Token用量已达上限", "tpm_limit_exceeded")
CONCURRENCY = (429, "并发请求数已达上限", "concurrency_limit_exceeded")
EXPIRED = (401, "API Key已过期", "api_key_expired")
IP = (403, "IP地址不在允许范围内", "ip_not_allowed")
DAILY_TOKENS = (429, "每日Token用量已达上限", "daily_token_limit_exceeded")
DAILY_REQUESTS = (429, "每日请求次数已达上限", "daily_request_limit_exceeded")
CODE_OF_MESSAGE = {
    msg: code for _, msg, code in (MODEL, RPM, TPM, CONCURRENCY, DAILY_TOKENS, DAILY_REQUESTS)
}


def key_of(name: str) -> str:
    return f"sk-policy-{name}-0123456789"


def write_yaml(
    env: Env,
    users: dict[str, dict[str, Any]],
    defaults: dict[str, Any] | None = None,
    groups: dict[str, dict[str, Any]] | None = None,
) -> None:
    """users.yaml with `defaults`, `groups` and users whose api_key is key_of(name)."""
    doc: dict[str, Any] = {"defaults": defaults or {}}
    if groups:
        doc["groups"] = groups
    doc["users"] = {name: {"api_key": key_of(name), **entry} for name, entry in users.items()}
    env.users_file.write_text(yaml.safe_dump(doc, allow_unicode=True))


def chat(model: str = "gpt-3.5-turbo", max_tokens: int | None = None, text: str = "hi") -> dict:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def assert_refusal(route: str, result: tuple[int, dict, Any], expected: tuple) -> None:
    """The answer in the route's shape: the contract's envelope with data.error = the code on
    /api/call.php; OpenAI's error object with error.code = the code on /v1."""
    status, doc, _ = result
    want_status, message, code = expected
    assert status == want_status, (status, doc)
    if route == CALL:
        assert doc["success"] is False, doc
        assert doc["message"] == message, doc
        if code in CODE_OF_MESSAGE.values() and code.startswith("daily_"):
            return  # the daily limits' envelope holds the counts, not a code
        assert doc["data"]["error"] == code, doc
    else:
        assert set(doc) == {"error"}, doc
        assert doc["error"]["code"] == code, doc
        assert doc["error"]["message"].startswith(message), doc


def code_of(route: str, doc: dict) -> str:
    """The machine code of a refusal, in either shape."""
    if route == CHAT:
        return str(doc["error"]["code"])
    data = doc.get("data") or {}
    return str(data.get("error") or CODE_OF_MESSAGE.get(doc["message"], doc["message"]))


async def totals(client: Client) -> tuple[int, int]:
    stats = (await client.status())["stats"]
    return stats["today_requests"], stats["today_tokens"]


def service_of(env: Env, n: int = 0) -> gateway.Service:
    svc = env.gateways[n].service
    assert svc is not None
    return svc


async def until(predicate: Any, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- an upstream that uses its cap


UNCAPPED = 1000  # what the echo upstream generates for a call sent without max_tokens


class _EchoHandler(tornado.web.RequestHandler):
    """Chat completions whose usage is the prompt's estimate plus the max_tokens the call
    was sent with (UNCAPPED without one): a model that uses everything it is allowed."""

    def initialize(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def post(self) -> None:
        fake = self.fake
        fake.requests.append((dict(self.request.headers), self.request.body))
        fake.in_flight += 1
        fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if fake.delay:
                await asyncio.sleep(fake.delay)
        finally:
            fake.in_flight -= 1
        request = json.loads(self.request.body)
        cap = request.get("max_tokens", request.get("max_completion_tokens"))
        completion = cap if isinstance(cap, int) else UNCAPPED
        prompt = gateway.estimate_request_tokens(request)
        self.finish(
            {
                "id": "chatcmpl-echo",
                "object": "chat.completion",
                "model": request.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "pong"},
                        "finish_reason": "length",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )


@pytest.fixture
async def echo(senv: Env) -> AsyncIterator[FakeUpstream]:
    """senv with the echo upstream in place of the fake one."""
    fake = FakeUpstream()
    app = tornado.web.Application([(r"/v1/chat/completions", _EchoHandler, {"fake": fake})])
    sock, fake.port = tornado.testing.bind_unused_port("127.0.0.1")
    fake.server = tornado.httpserver.HTTPServer(app)
    fake.server.add_sockets([sock])
    senv.upstream = fake
    yield fake
    for g in list(senv.gateways):  # before the upstream goes
        await senv.stop(g)
    fake.server.stop()
    await fake.server.close_all_connections()


def sent_max_tokens(fake: FakeUpstream) -> list[int | None]:
    return [json.loads(body).get("max_tokens") for _, body in fake.requests]


# ---------------------------------------------------------------- 1. inheritance and checks

ALL_D = {
    "daily_request_limit": 11,
    "daily_token_limit": 111,
    "models": ["d-*"],
    "rpm": 1,
    "tpm": 10,
    "max_concurrency": 1,
    "expires": date(2030, 1, 1),
    "allow_ips": ["10.0.0.0/8"],
    "weight": 2,
    "token_policy": "admit",
}
ALL_G = {
    "daily_request_limit": 22,
    "daily_token_limit": 222,
    "models": ["g-*", "gpt-4o-mini"],
    "rpm": 2,
    "tpm": 20,
    "max_concurrency": 2,
    "expires": date(2031, 2, 2),
    "allow_ips": ["172.16.0.0/12", "192.168.1.7"],
    "weight": 3,
    "token_policy": "strict",
}
ALL_U = {
    "daily_request_limit": 33,
    "daily_token_limit": 333,
    "models": ["u-*"],
    "rpm": 3,
    "tpm": 30,
    "max_concurrency": 3,
    "expires": date(2032, 3, 3),
    "allow_ips": ["192.168.0.0/16"],
    "weight": 4,
    "token_policy": "reserve",
}
FIELDS = tuple(ALL_D)


def settings_of(user: gateway.User) -> dict[str, Any]:
    """A parsed user's settings, in users.yaml's terms."""
    p = user.policy
    return {
        "daily_request_limit": user.daily_request_limit,
        "daily_token_limit": user.daily_token_limit,
        "models": list(p.models),
        "rpm": p.rpm,
        "tpm": p.tpm,
        "max_concurrency": p.max_concurrency,
        "expires": p.expires,
        "allow_ips": p.allow_ips,
        "weight": p.weight,
        "token_policy": p.token_policy,
    }


def normal(s: dict[str, Any]) -> dict[str, Any]:
    out = dict(s)
    out["allow_ips"] = tuple(ipaddress.ip_network(a) for a in s["allow_ips"])
    return out


BUILT_IN = {
    "daily_request_limit": 1000,
    "daily_token_limit": 100000,
    "models": ["*"],
    "rpm": 0,
    "tpm": 0,
    "max_concurrency": 0,
    "expires": None,
    "allow_ips": [],
    "weight": 1,
    "token_policy": "reserve",
}


def test_every_field_inherits_defaults_then_group_then_user() -> None:
    users: dict[str, dict[str, Any]] = {
        "plain": {},
        "grouped": {"group": "g"},
        "in_empty_group": {"group": "empty"},
        "own": {"group": "g", **ALL_U},
        "own_no_group": dict(ALL_U),
    }
    for f in FIELDS:  # one field of the user's own over the group's others
        users[f"only_{f}"] = {"group": "g", f: ALL_U[f]}
        users[f"group_{f}"] = {"group": f"g_{f}"}  # a group setting one field over defaults
    groups: dict[str, Any] = {"g": ALL_G, "empty": {}}
    groups.update({f"g_{f}": {f: ALL_G[f]} for f in FIELDS})
    doc = {
        "defaults": ALL_D,
        "groups": groups,
        "users": {n: {"api_key": key_of(n), **e} for n, e in users.items()},
    }
    parsed = gateway.parse_users(yaml.safe_dump(doc))
    assert settings_of(parsed["plain"]) == normal(ALL_D)
    assert settings_of(parsed["in_empty_group"]) == normal(ALL_D)
    assert settings_of(parsed["grouped"]) == normal(ALL_G)
    assert parsed["grouped"].group == "g"
    assert settings_of(parsed["own"]) == normal(ALL_U)
    assert settings_of(parsed["own_no_group"]) == normal(ALL_U)
    for f in FIELDS:
        assert settings_of(parsed[f"only_{f}"]) == normal({**ALL_G, f: ALL_U[f]}), f
        assert settings_of(parsed[f"group_{f}"]) == normal({**ALL_D, f: ALL_G[f]}), f
    # nothing set anywhere: the built-in defaults
    bare = gateway.parse_users(yaml.safe_dump({"users": {"x": {"api_key": key_of("x")}}}))
    assert settings_of(bare["x"]) == normal(BUILT_IN)
    assert bare["x"].policy == gateway.Policy()


def test_expires_as_text_and_the_readme_example_parse() -> None:
    text = f"""
defaults: {{daily_request_limit: 1000, daily_token_limit: 100000, token_policy: reserve}}
groups:
  interns: {{daily_token_limit: 20000, models: ["gpt-4o-mini", "deepseek-*"], rpm: 10}}
users:
  alice:
    api_key: {key_of("alice")}
    group: interns
    models: ["*"]
    rpm: 30
    tpm: 50000
    max_concurrency: 2
    expires: 2027-03-31
    allow_ips: [10.0.0.0/8, 192.168.1.7]
    weight: 1
    token_policy: reserve
  bob:
    api_key: {key_of("bob")}
    group: interns
    expires: "2027-03-31"
"""
    users = gateway.parse_users(text)
    a, b = users["alice"].policy, users["bob"].policy
    assert users["alice"].daily_token_limit == 20000 == users["bob"].daily_token_limit
    assert a.models == ("*",) and a.rpm == 30 and a.tpm == 50000 and a.max_concurrency == 2
    assert a.expires == date(2027, 3, 31) == b.expires
    assert a.allows_address("10.9.8.7") and a.allows_address("192.168.1.7")
    assert not a.allows_address("192.168.1.8") and not a.allows_address("11.0.0.1")
    assert a.allows_address("::ffff:10.0.0.1")  # an IPv4 client on a dual-stack socket
    assert b.models == ("gpt-4o-mini", "deepseek-*") and b.rpm == 10
    assert b.allows_model("deepseek-chat") and not b.allows_model("gpt-4o")
    assert a.allows_model("anything") and b.token_policy == "reserve"


def test_a_user_in_an_unknown_group_is_refused() -> None:
    doc = {
        "groups": {"interns": {"rpm": 1}},
        "users": {"alice": {"api_key": key_of("alice"), "group": "internz"}},
    }
    with pytest.raises(gateway.ConfigError, match="internz"):
        gateway.parse_users(yaml.safe_dump(doc))
    doc["users"]["alice"]["group"] = "interns"
    assert gateway.parse_users(yaml.safe_dump(doc))["alice"].policy.rpm == 1


BAD_VALUES = [
    ("rpm", -1),
    ("tpm", -5),
    ("max_concurrency", 1.5),
    ("rpm", True),
    ("weight", 0),
    ("weight", 1001),
    ("token_policy", "x"),
    ("expires", "tomorrow"),
    ("expires", "2027-02-30"),
    ("allow_ips", ["nope"]),
    ("allow_ips", "10.0.0.0/8"),
    ("models", []),
    ("models", "gpt-4o"),
    ("daily_token_limit", -1),
]


@pytest.mark.parametrize("where", ["defaults", "group", "user"])
@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_a_config_error_naming_the_field(where: str, field: str, value: Any) -> None:
    entry = {field: value}
    doc: dict[str, Any] = {
        "defaults": entry if where == "defaults" else {},
        "groups": {"g": entry if where == "group" else {}},
        "users": {"alice": {"api_key": key_of("alice"), "group": "g"}},
    }
    if where == "user":
        doc["users"]["alice"].update(entry)
    with pytest.raises(gateway.ConfigError) as info:
        gateway.parse_users(yaml.safe_dump(doc))
    prefix = {"defaults": "defaults", "group": "groups.g", "user": "users.alice"}[where]
    assert f"{prefix}.{field}" in str(info.value)


async def test_inheritance_over_http(senv: Env) -> None:
    write_yaml(
        senv,
        {
            "intern": {"group": "interns"},
            "senior": {"group": "interns", "models": ["*"], "rpm": 0},
            "outsider": {},
        },
        defaults={"rpm": 1},
        groups={"interns": {"models": ["gpt-4o-mini"], "daily_request_limit": 5}},
    )
    client = await senv.start()
    # the group's models, the defaults' rpm
    assert_refusal(CALL, await client.call(chat("gpt-3.5-turbo"), key=key_of("intern")), MODEL)
    assert (await client.call(chat("gpt-4o-mini"), key=key_of("intern")))[0] == 200
    assert_refusal(CALL, await client.call(chat("gpt-4o-mini"), key=key_of("intern")), RPM)
    # the user's own models and rpm over both; the group's daily limit still applies
    codes = [(await client.call(chat(), key=key_of("senior")))[0] for _ in range(6)]
    assert codes == [200] * 5 + [429]
    # no group: the defaults' rpm, every model
    assert (await client.call(chat("whatever-model"), key=key_of("outsider")))[0] == 200
    assert_refusal(CHAT, await client.call(chat(), key=key_of("outsider"), path=CHAT), RPM)
    assert len(senv.upstream.requests) == 7


# ---------------------------------------------------------------- 2. every answer of the table


async def test_every_policy_answer_on_both_routes_costs_nothing(senv: Env) -> None:
    users: dict[str, dict[str, Any]] = {}
    for r in ("call", "v1"):
        users[f"narrow_{r}"] = {"models": ["gpt-4o-mini", "deepseek-*"]}
        users[f"rpm_{r}"] = {"rpm": 1}
        users[f"tpm_{r}"] = {"tpm": 1}
        users[f"mc_{r}"] = {"max_concurrency": 1}
        users[f"expired_{r}"] = {"expires": "2000-01-01"}
        users[f"far_{r}"] = {"allow_ips": ["10.0.0.0/8"]}
    write_yaml(senv, users)
    client = await senv.start()
    fake = senv.upstream

    async def refused(route: str, name: str, expected: tuple, body: dict | None = None) -> Any:
        before, sent = await totals(client), len(fake.requests)
        result = await client.call(body or chat(), key=key_of(name), path=route)
        assert_refusal(route, result, expected)
        assert await totals(client) == before, "a refusal was charged"
        assert len(fake.requests) == sent, "a refused call reached the upstream"
        return result

    for route, r in ((CALL, "call"), (CHAT, "v1")):
        await refused(route, f"narrow_{r}", MODEL, chat("gpt-3.5-turbo"))
        assert (await client.call(chat("deepseek-chat"), key=key_of(f"narrow_{r}"), path=route))[
            0
        ] == 200
        await refused(route, f"expired_{r}", EXPIRED)
        await refused(route, f"far_{r}", IP)
        for name, expected in ((f"rpm_{r}", RPM), (f"tpm_{r}", TPM)):
            assert (await client.call(chat(), key=key_of(name), path=route))[0] == 200
            _, _, headers = await refused(route, name, expected)
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert headers["x-should-retry"] == "true"
        # one call in flight; the second is refused while it runs
        fake.delay = 0.5
        first = asyncio.ensure_future(client.call(chat(), key=key_of(f"mc_{r}"), path=route))
        await until(lambda: fake.in_flight == 1, what="the first call at the upstream")
        before, sent = await totals(client), len(fake.requests)
        result = await client.call(chat(), key=key_of(f"mc_{r}"), path=route)
        assert_refusal(route, result, CONCURRENCY)
        assert result[2]["x-should-retry"] == "false"
        assert len(fake.requests) == sent
        assert (await first)[0] == 200
        assert (await totals(client))[0] == before[0] + 1  # the first call only
        fake.delay = 0
        assert (await client.call(chat(), key=key_of(f"mc_{r}"), path=route))[0] == 200


# ---------------------------------------------------------------- 3. expires


async def test_expires_yesterday_is_refused_today_works_until_midnight(senv: Env) -> None:
    today = datetime.fromtimestamp(senv.clock.t, SHANGHAI).date()
    write_yaml(
        senv,
        {
            "yesterday": {"expires": (today - timedelta(days=1)).isoformat()},
            "today": {"expires": today.isoformat()},
            "tomorrow": {"expires": today + timedelta(days=1)},
        },
    )
    client = await senv.start()
    for route in ROUTES:
        assert_refusal(route, await client.call(key=key_of("yesterday"), path=route), EXPIRED)
        assert (await client.call(key=key_of("today"), path=route))[0] == 200
        assert (await client.call(key=key_of("tomorrow"), path=route))[0] == 200
    # the next day in Asia/Shanghai: today's key has expired, tomorrow's still works
    midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), SHANGHAI)
    senv.clock.t = midnight.timestamp() + 1
    for route in ROUTES:
        assert_refusal(route, await client.call(key=key_of("today"), path=route), EXPIRED)
        assert (await client.call(key=key_of("tomorrow"), path=route))[0] == 200
    assert len(senv.upstream.requests) == 6


# ---------------------------------------------------------------- 4. allow_ips


async def test_allow_ips_by_remote_address(senv: Env) -> None:
    write_yaml(
        senv,
        {
            "local": {"allow_ips": ["127.0.0.1"]},
            "loopback_net": {"allow_ips": ["10.0.0.0/8", "127.0.0.0/8"]},
            "ten": {"allow_ips": ["10.0.0.0/8"]},
        },
    )
    client = await senv.start()
    for route in ROUTES:
        assert (await client.call(key=key_of("local"), path=route))[0] == 200
        assert (await client.call(key=key_of("loopback_net"), path=route))[0] == 200
        assert_refusal(route, await client.call(key=key_of("ten"), path=route), IP)
        # without --xheaders a forwarded address is not believed
        spoof = {"X-Forwarded-For": "10.1.2.3", "X-Real-Ip": "10.1.2.3"}
        assert_refusal(route, await client.call(key=key_of("ten"), path=route, headers=spoof), IP)
    assert len(senv.upstream.requests) == 4


async def test_allow_ips_behind_a_proxy_with_xheaders(senv: Env) -> None:
    write_yaml(
        senv,
        {"local": {"allow_ips": ["127.0.0.1"]}, "ten": {"allow_ips": ["10.0.0.0/8"]}},
    )
    client = await senv.start(xheaders=True)
    inside = {"X-Forwarded-For": "10.1.2.3"}
    outside = {"X-Forwarded-For": "192.168.5.5"}
    chain = {"X-Forwarded-For": "8.8.8.8, 10.200.0.1"}  # the proxy's own view is the last one
    for route in ROUTES:
        assert (await client.call(key=key_of("ten"), path=route, headers=inside))[0] == 200
        assert (await client.call(key=key_of("ten"), path=route, headers=chain))[0] == 200
        assert_refusal(route, await client.call(key=key_of("ten"), path=route, headers=outside), IP)
        assert_refusal(route, await client.call(key=key_of("ten"), path=route), IP)
        # the client's address is the forwarded one, no longer 127.0.0.1
        assert_refusal(
            route, await client.call(key=key_of("local"), path=route, headers=inside), IP
        )
        assert (await client.call(key=key_of("local"), path=route))[0] == 200
    assert len(senv.upstream.requests) == 6


# ---------------------------------------------------------------- 5. rpm


async def test_rpm_is_exact_under_concurrency_and_rolls_over(senv: Env) -> None:
    write_yaml(senv, {"alice": {"rpm": 3}})
    senv.upstream.delay = 0.05
    client = await senv.start(concurrency=20, queue_size=20)
    for round_ in range(2):
        results = await asyncio.gather(
            *(client.call(key=key_of("alice"), path=ROUTES[i % 2]) for i in range(10))
        )
        codes = [r[0] for r in results]
        assert codes.count(200) == 3, codes
        assert codes.count(429) == 7, codes
        for i, (status, _, headers) in enumerate(results):
            if status == 429:
                assert_refusal(ROUTES[i % 2], results[i], RPM)
                assert 1 <= int(headers["Retry-After"]) <= 60
        assert len(senv.upstream.requests) == 3 * (round_ + 1)
        assert (await totals(client))[0] == 3 * (round_ + 1)
        # 59 s later the minute is still full; past 60 s it has rolled over
        senv.clock.t += 59
        _, _, headers = await client.call(key=key_of("alice"))
        assert int(headers["Retry-After"]) == 1
        senv.clock.t += 1.5


async def test_rpm_does_not_count_failed_calls(senv: Env) -> None:
    write_yaml(senv, {"alice": {"rpm": 2}})
    client = await senv.start()
    senv.upstream.status = 500
    for _ in range(4):
        assert (await client.call(key=key_of("alice")))[0] == 502
    senv.upstream.status = 200
    codes = [(await client.call(key=key_of("alice")))[0] for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.slow
async def test_rpm_is_exact_across_two_processes(penv: Env, procs, tmp_path: Path) -> None:
    write_yaml(penv, {"alice": {"rpm": 5}})
    penv.upstream.delay = 0.05
    a = procs(proc_args(penv), tmp_path / "a.log", KEY_ENV)
    b = procs(proc_args(penv), tmp_path / "b.log", KEY_ENV)
    await asyncio.gather(a.ready(), b.ready())
    results = await asyncio.gather(
        *(post(penv.http, (a if i % 2 else b).base, key_of("alice")) for i in range(20))
    )
    codes = [c for c, _ in results]
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 15, codes
    assert {d["data"]["error"] for c, d in results if c == 429} == {"rpm_limit_exceeded"}
    assert len(penv.upstream.requests) == 5


@pytest.mark.parametrize("how", ["restart", "second_gateway"])
async def test_the_minute_survives_a_restart(senv: Env, how: str) -> None:
    """rpm and tpm are rolling minutes: a gateway restarted (or a second process started on the
    data dir) within the minute must still count the calls made before it started."""
    write_yaml(senv, {"r": {"rpm": 3}, "t": {"tpm": 30, "token_policy": "admit"}})
    client = await senv.start()
    for _ in range(3):
        assert (await client.call(key=key_of("r")))[0] == 200
    for _ in range(2):  # 15 tokens each
        assert (await client.call(key=key_of("t")))[0] == 200
    assert_refusal(CALL, await client.call(key=key_of("r")), RPM)
    assert_refusal(CALL, await client.call(key=key_of("t")), TPM)
    if how == "restart":
        await senv.stop()  # writes the day's snapshot
    else:
        await senv.gateways[0]._maintain()  # the periodic chore writes the day's snapshot
    client = await senv.start()  # another store on the data dir, same clock: the same minute
    # The snapshot keeps the minute's calls and tokens: a process that starts from it does
    # not count the minute from zero.
    assert_refusal(CALL, await client.call(key=key_of("r")), RPM)
    assert_refusal(CALL, await client.call(key=key_of("t")), TPM)


# ---------------------------------------------------------------- 6. max_concurrency


async def test_max_concurrency_is_exact_and_frees_its_slots(senv: Env) -> None:
    write_yaml(senv, {"alice": {"max_concurrency": 2}})
    senv.upstream.delay = 0.5
    client = await senv.start(concurrency=10, queue_size=10)
    results = await asyncio.gather(
        *(client.call(key=key_of("alice"), path=ROUTES[i % 2]) for i in range(6))
    )
    codes = [r[0] for r in results]
    assert codes.count(200) == 2, codes
    assert codes.count(429) == 4, codes
    for i, r in enumerate(results):
        if r[0] == 429:
            assert_refusal(ROUTES[i % 2], r, CONCURRENCY)
    assert senv.upstream.max_in_flight == 2
    senv.upstream.delay = 0
    for route in ROUTES:
        assert (await client.call(key=key_of("alice"), path=route))[0] == 200
    # a failed call frees its slot too
    senv.upstream.status = 500
    assert (await client.call(key=key_of("alice")))[0] == 502
    senv.upstream.status = 200
    results = await asyncio.gather(*(client.call(key=key_of("alice")) for _ in range(2)))
    assert [r[0] for r in results] == [200, 200]
    assert (await totals(client))[0] == 6


async def test_max_concurrency_counts_queued_calls(senv: Env) -> None:
    """Calls waiting for a worker hold their slot as well as calls at the upstream."""
    write_yaml(senv, {"alice": {"max_concurrency": 3}})
    senv.upstream.delay = 0.3
    client = await senv.start(concurrency=1, queue_size=10)
    results = await asyncio.gather(*(client.call(key=key_of("alice")) for _ in range(5)))
    codes = [r[0] for r in results]
    assert (codes.count(200), codes.count(429)) == (3, 2), codes
    assert senv.upstream.max_in_flight == 1


@pytest.mark.slow
async def test_max_concurrency_is_exact_across_two_processes(
    penv: Env, procs, tmp_path: Path
) -> None:
    write_yaml(penv, {"alice": {"max_concurrency": 2}})
    penv.upstream.delay = 1.0
    a = procs(proc_args(penv), tmp_path / "a.log", KEY_ENV)
    b = procs(proc_args(penv), tmp_path / "b.log", KEY_ENV)
    await asyncio.gather(a.ready(), b.ready())
    results = await asyncio.gather(
        *(post(penv.http, (a if i % 2 else b).base, key_of("alice")) for i in range(12))
    )
    codes = [c for c, _ in results]
    assert penv.upstream.max_in_flight == 2
    assert codes.count(200) == 2, codes
    assert codes.count(429) == 10, codes
    assert {d["data"]["error"] for c, d in results if c == 429} == {"concurrency_limit_exceeded"}
    penv.upstream.delay = 0
    assert (await post(penv.http, a.base, key_of("alice")))[0] == 200
    assert (await post(penv.http, b.base, key_of("alice")))[0] == 200


# ---------------------------------------------------------------- 7. tpm


@pytest.mark.parametrize(("tpm", "total"), [(30, 15), (30, 7), (100, 100), (101, 100)])
async def test_tpm_admits_while_the_minute_is_under_it(senv: Env, tpm: int, total: int) -> None:
    write_yaml(senv, {"alice": {"tpm": tpm, "token_policy": "admit"}})
    senv.upstream.usage = {
        "prompt_tokens": 1,
        "completion_tokens": total - 1,
        "total_tokens": total,
    }
    client = await senv.start()
    admitted = math.ceil(tpm / total)  # admitted while the minute's tokens < tpm
    for n in range(admitted):
        assert (await client.call(key=key_of("alice"), path=ROUTES[n % 2]))[0] == 200, n
    for route in ROUTES:
        result = await client.call(key=key_of("alice"), path=route)
        assert_refusal(route, result, TPM)
        assert 1 <= int(result[2]["Retry-After"]) <= 60
    assert len(senv.upstream.requests) == admitted
    assert await totals(client) == (admitted, admitted * total)
    senv.clock.t += 61  # the minute rolls over
    assert (await client.call(key=key_of("alice")))[0] == 200


async def test_tpm_counts_the_holds_of_calls_in_flight(senv: Env) -> None:
    """reserve: a call in flight holds prompt + max_tokens against the minute; admit does not."""
    write_yaml(
        senv,
        {
            "holder": {"tpm": 500, "token_policy": "reserve"},
            "admitter": {"tpm": 500, "token_policy": "admit"},
        },
    )
    senv.upstream.delay = 0.4
    client = await senv.start()
    for name, second in (("holder", 429), ("admitter", 200)):
        first = asyncio.ensure_future(client.call(chat(max_tokens=500), key=key_of(name)))
        await until(lambda: senv.upstream.in_flight == 1)
        result = await client.call(chat(max_tokens=10), key=key_of(name))
        assert result[0] == second, (name, result)
        if second == 429:
            assert_refusal(CALL, result, TPM)
        assert (await first)[0] == 200
        await until(lambda: senv.upstream.in_flight == 0)


# ---------------------------------------------------------------- 8. token policies


CASE_LIMIT = 1000


async def _burst_of_20(senv: Env, policy: str, fake: FakeUpstream) -> tuple[int, int, list]:
    """20 calls of max_tokens 500 at once against a 1,000-token limit; (admitted, charged,
    the max_tokens the upstream received)."""
    name = f"u_{policy}"
    client = Client(f"http://127.0.0.1:{senv.gateways[0].port}", senv.http)
    fake.requests.clear()
    before = (await totals(client))[1]
    results = await asyncio.gather(
        *(
            client.call(chat(max_tokens=500), key=key_of(name), path=ROUTES[i % 2])
            for i in range(20)
        )
    )
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 429}, codes
    for i, r in enumerate(results):
        if r[0] == 429:
            assert code_of(ROUTES[i % 2], r[1]) == "daily_token_limit_exceeded", r
    charged = (await totals(client))[1] - before
    return codes.count(200), charged, sent_max_tokens(fake)


async def test_token_policies_on_the_case_fixed_usage(senv: Env) -> None:
    """usage 500 whatever the call's max_tokens (the fake's fixed usage)."""
    write_yaml(
        senv,
        {
            f"u_{p}": {"daily_token_limit": CASE_LIMIT, "token_policy": p}
            for p in gateway.TOKEN_POLICIES
        },
    )
    senv.upstream.usage = {"prompt_tokens": 5, "completion_tokens": 495, "total_tokens": 500}
    senv.upstream.delay = 0.3
    await senv.start(concurrency=50, queue_size=50)
    out = {p: await _burst_of_20(senv, p, senv.upstream) for p in gateway.TOKEN_POLICIES}
    for p, (admitted, charged, sent) in out.items():
        print(
            f"\n[token_policy case 1: 20 calls x max_tokens 500, usage 500, limit {CASE_LIMIT}] "
            f"{p}: admitted {admitted}, charged {charged}, overshoot {charged - CASE_LIMIT} "
            f"(upstream max_tokens {sorted(sent)})"
        )
    admitted, charged, sent = out["admit"]
    assert admitted == 20 and charged == 10_000  # the old rule: 9,000 over
    admitted, charged, sent = out["reserve"]
    assert admitted == 2 and charged <= CASE_LIMIT
    assert sent == [500, 500]  # reserve never touches the call
    admitted, charged, sent = out["strict"]
    assert admitted == 2 and charged <= CASE_LIMIT
    assert max(sent) == 500 and min(sent) < 500, sent  # lowered, never raised


async def test_token_policies_on_the_case_usage_follows_max_tokens(
    senv: Env, echo: FakeUpstream
) -> None:
    """The same case against a model that uses every token it is allowed."""
    write_yaml(
        senv,
        {
            f"u_{p}": {"daily_token_limit": CASE_LIMIT, "token_policy": p}
            for p in gateway.TOKEN_POLICIES
        },
    )
    echo.delay = 0.3
    await senv.start(concurrency=50, queue_size=50)
    out = {p: await _burst_of_20(senv, p, echo) for p in gateway.TOKEN_POLICIES}
    for p, (admitted, charged, sent) in out.items():
        print(
            f"\n[token_policy case 1b: 20 calls x max_tokens 500, usage = prompt + max_tokens "
            f"sent, limit {CASE_LIMIT}] {p}: admitted {admitted}, charged {charged}, "
            f"overshoot {charged - CASE_LIMIT} (upstream max_tokens {sorted(sent)})"
        )
    assert out["admit"][0] == 20 and out["admit"][1] > 10 * CASE_LIMIT
    # reserve admits while used + held < limit: the last call admitted may pass it by its hold
    assert out["reserve"][0] == 2 and out["reserve"][1] <= CASE_LIMIT - 1 + 501
    admitted, charged, sent = out["strict"]
    assert admitted == 2 and charged <= CASE_LIMIT
    assert max(sent) == 500 and min(sent) < 500


async def test_strict_refuses_a_prompt_that_alone_does_not_fit(senv: Env) -> None:
    write_yaml(senv, {"alice": {"daily_token_limit": 100, "token_policy": "strict"}})
    client = await senv.start()
    long_prompt = "word " * 200  # ~250 tokens estimated
    for route in ROUTES:
        result = await client.call(chat(text=long_prompt), key=key_of("alice"), path=route)
        assert_refusal(route, result, DAILY_TOKENS)
    assert len(senv.upstream.requests) == 0
    assert await totals(client) == (0, 0)
    # a short one fits, and is sent with max_tokens lowered to what is left
    assert (await client.call(chat(max_tokens=5000), key=key_of("alice")))[0] == 200
    (sent,) = sent_max_tokens(senv.upstream)
    assert sent is not None and sent <= 100 - 1


async def test_strict_lowers_max_completion_tokens_in_its_own_field(senv: Env) -> None:
    write_yaml(senv, {"alice": {"daily_token_limit": 300, "token_policy": "strict"}})
    client = await senv.start()
    body = chat()
    body["max_completion_tokens"] = 100_000
    assert (await client.call(body, key=key_of("alice"), path=CHAT))[0] == 200
    sent = json.loads(senv.upstream.requests[-1][1])
    assert "max_tokens" not in sent
    assert 0 < sent["max_completion_tokens"] <= 300
    body["max_completion_tokens"] = 7  # below what is left: untouched
    assert (await client.call(body, key=key_of("alice"), path=CHAT))[0] == 200
    assert json.loads(senv.upstream.requests[-1][1])["max_completion_tokens"] == 7


async def test_strict_caps_a_call_sent_without_max_tokens(senv: Env, echo: FakeUpstream) -> None:
    """A call without max_tokens is the one that could use everything: strict must cap it to
    what is left, or the limit is only as good as the model's own length limit."""
    write_yaml(senv, {"alice": {"daily_token_limit": 300, "token_policy": "strict"}})
    client = await senv.start()
    assert (await client.call(chat(), key=key_of("alice")))[0] == 200
    assert sent_max_tokens(echo) != [None], "strict sent a call without any max_tokens cap"
    assert (await totals(client))[1] <= 300


async def test_strict_never_sends_the_clients_max_tokens_when_nothing_is_left(
    senv: Env, echo: FakeUpstream
) -> None:
    """What is left equals the prompt estimate exactly: no room for a single generated token,
    so the call must be refused (or sent with max_tokens lowered), never sent as it came."""
    body = chat(text="abcd" * 9, max_tokens=500)
    prompt = gateway.estimate_request_tokens(body)
    assert prompt == 9
    write_yaml(senv, {"alice": {"daily_token_limit": prompt, "token_policy": "strict"}})
    client = await senv.start()
    status, _, _ = await client.call(body, key=key_of("alice"))
    sent = sent_max_tokens(echo)
    assert status == 429 or (sent and sent[0] is not None and sent[0] < 500), (status, sent)
    assert (await totals(client))[1] <= prompt


async def test_token_policies_200_random_calls(senv: Env, echo: FakeUpstream) -> None:
    """200 concurrent calls with random prompts and max_tokens (always set) against a model
    that uses all it is sent; strict stays within 5% of the limit."""
    limit = 20_000
    write_yaml(
        senv,
        {f"u_{p}": {"daily_token_limit": limit, "token_policy": p} for p in gateway.TOKEN_POLICIES},
    )
    echo.delay = 0.2
    client = await senv.start(concurrency=250, queue_size=250)
    rng = random.Random(20250101)
    bodies = [
        chat(max_tokens=rng.randint(1, 1200), text=f"{i} " + "x" * rng.randint(0, 400))
        for i in range(200)
    ]
    holds = [gateway.estimate_request_tokens(b) + b["max_tokens"] for b in bodies]
    for policy in gateway.TOKEN_POLICIES:
        echo.requests.clear()
        before = (await totals(client))[1]
        results = await asyncio.gather(
            *(
                client.call(b, key=key_of(f"u_{policy}"), path=ROUTES[i % 2])
                for i, b in enumerate(bodies)
            )
        )
        codes = [r[0] for r in results]
        assert set(codes) <= {200, 429}, codes
        charged = (await totals(client))[1] - before
        lowered = raised = 0
        for _, raw in echo.requests:
            sent = json.loads(raw)
            asked = bodies[int(sent["messages"][0]["content"].split()[0])]["max_tokens"]
            lowered += sent["max_tokens"] < asked
            raised += sent["max_tokens"] > asked
        print(
            f"\n[token_policy case 2: 200 random calls, max_tokens 1-1200, usage = prompt + "
            f"max_tokens sent, limit {limit}] {policy}: admitted {codes.count(200)}, charged "
            f"{charged}, overshoot {charged - limit} ({100 * (charged - limit) / limit:+.1f}%), "
            f"calls lowered {lowered}"
        )
        assert len(echo.requests) == codes.count(200)
        assert raised == 0
        if policy == "strict":
            assert charged <= limit * 1.05
        elif policy == "reserve":
            assert lowered == 0
            assert charged <= limit - 1 + max(holds)
        else:
            assert lowered == 0
            assert charged > limit  # admit lets the whole burst through


# ---------------------------------------------------------------- 9. fair share


async def test_a_second_user_is_not_stuck_behind_a_flood(senv: Env) -> None:
    write_yaml(senv, {"a": {}, "b": {}})
    senv.upstream.delay = 0.5
    client = await senv.start(concurrency=2, queue_size=64, user_queue_share=1.0)
    queue = service_of(senv).queue
    flood = [
        asyncio.ensure_future(client.call(chat("model-a"), key=key_of("a"))) for _ in range(40)
    ]
    await until(lambda: queue.waiting + queue.processing == 40, what="A's 40 calls queued")
    t0 = time.monotonic()
    status, _, _ = await client.call(chat("model-b"), key=key_of("b"))
    took = time.monotonic() - t0
    print(f"\n[fair share] B's call behind A's 40 queued calls: {took:.2f} s")
    assert status == 200
    assert took < 3 * 0.5, took
    senv.upstream.delay = 0  # the rest of A's calls, quickly
    assert [r[0] for r in await asyncio.gather(*flood)] == [200] * 40
    models = [json.loads(b)["model"] for _, b in senv.upstream.requests]
    assert models.index("model-b") <= 4, models[:10]


async def test_one_user_may_take_only_its_share_of_the_queue(senv: Env) -> None:
    write_yaml(senv, {"a": {}, "b": {}})
    senv.upstream.delay = 1.0
    client = await senv.start(concurrency=2, queue_size=8)  # default share 0.5: 4 waiting
    queue = service_of(senv).queue
    assert queue.user_room == 4
    flood = [
        asyncio.ensure_future(client.call(chat("model-a"), key=key_of("a"))) for _ in range(20)
    ]
    await until(lambda: sum(f.done() for f in flood) >= 14, what="A's refusals")
    refused = [f.result() for f in flood if f.done()]
    assert len(refused) == 14, [r[0] for r in refused]
    for status, doc, headers in refused:
        assert status == 503 and doc["message"] == "队列已满", doc
        assert "share" in doc["data"]["error"], doc
        assert headers["Retry-After"] == "1"
    t0 = time.monotonic()
    b_status, b_doc, _ = await client.call(chat("model-b"), key=key_of("b"))
    took = time.monotonic() - t0
    assert b_status == 200, b_doc
    assert took < 2 * 1.0 + 0.5, took  # behind the two running calls only
    senv.upstream.delay = 0
    a_codes = [r[0] for r in await asyncio.gather(*flood)]
    assert (a_codes.count(200), a_codes.count(503)) == (6, 14), a_codes
    # the refused calls cost nothing and never reached the upstream
    assert len(senv.upstream.requests) == 7
    assert (await totals(client))[0] == 7
    # once A's line is short again, A gets in
    assert (await client.call(chat("model-a"), key=key_of("a")))[0] == 200


# ---------------------------------------------------------------- 10. weight


async def test_weight_shares_the_workers(senv: Env) -> None:
    write_yaml(senv, {"a": {"weight": 3}, "b": {"weight": 1}, "c": {}})
    senv.upstream.delay = 0.5  # the blocker's
    client = await senv.start(concurrency=1, queue_size=64, user_queue_share=1.0)
    queue = service_of(senv).queue
    blocker = asyncio.ensure_future(client.call(chat("blocker"), key=key_of("c")))
    await until(lambda: senv.upstream.in_flight == 1)
    senv.upstream.delay = 0.02
    calls = [
        asyncio.ensure_future(client.call(chat(f"model-{u}"), key=key_of(u)))
        for _ in range(20)
        for u in "ab"
    ]
    await until(lambda: queue.waiting == 40, what="40 calls waiting")
    await blocker
    assert [r[0] for r in await asyncio.gather(*calls)] == [200] * 40
    models = [json.loads(b)["model"] for _, b in senv.upstream.requests]
    assert models[0] == "blocker"
    first = models[1:17]
    print(f"\n[weight 3:1] first 16 served: {''.join(m[-1] for m in first)}")
    assert abs(first.count("model-a") - 12) <= 1, first


# ---------------------------------------------------------------- 11. property


_seq = itertools.count()

POLICIES = st.fixed_dictionaries(
    {
        "rpm": st.sampled_from([0, 1, 3, 7]),
        "tpm": st.sampled_from([0, 0, 200, 2000]),
        "max_concurrency": st.sampled_from([0, 0, 1, 2, 5]),
        "token_policy": st.sampled_from(gateway.TOKEN_POLICIES),
        "daily_request_limit": st.integers(1, 14),
        "daily_token_limit": st.sampled_from([1, 50, 300, 1000, 5000, 10**6]),
    }
)
KNOWN_CODES = {
    "daily_request_limit_exceeded",
    "daily_token_limit_exceeded",
    "rpm_limit_exceeded",
    "tpm_limit_exceeded",
    "concurrency_limit_exceeded",
}


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a gateway run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    policy=POLICIES,
    calls=st.lists(
        st.tuples(st.integers(1, 300), st.integers(0, 200), st.sampled_from(ROUTES)),
        min_size=1,
        max_size=16,
    ),
)
async def test_property_no_burst_is_admitted_past_any_limit(
    senv: Env, echo: FakeUpstream, policy: dict[str, Any], calls: list[tuple[int, int, str]]
) -> None:
    name = f"p{next(_seq)}"
    write_yaml(senv, {name: policy})
    echo.delay = 0.1
    echo.requests.clear()
    echo.max_in_flight = 0
    client = await senv.start(concurrency=32, queue_size=32)
    try:
        before = await totals(client)
        bodies = [chat(max_tokens=mt, text="y" * chars) for mt, chars, _ in calls]
        routes = [route for _, _, route in calls]
        results = await asyncio.gather(
            *(client.call(b, key=key_of(name), path=r) for b, r in zip(bodies, routes, strict=True))
        )
        usage = n_ok = 0
        for route, (status, doc, _) in zip(routes, results, strict=True):
            if status == 200:
                n_ok += 1
                usage += (doc["data"]["usage"] if route == CALL else doc["usage"])["total_tokens"]
            else:
                assert 400 <= status < 500, (status, doc)
                assert code_of(route, doc) in KNOWN_CODES, doc
        after = await totals(client)
        requests, charged = after[0] - before[0], after[1] - before[1]
        # nothing refused went upstream or was charged
        assert len(echo.requests) == n_ok == requests
        assert charged == usage
        # never past a limit
        assert n_ok <= policy["daily_request_limit"]
        if policy["rpm"]:
            assert n_ok <= policy["rpm"]
        if policy["max_concurrency"]:
            assert echo.max_in_flight <= policy["max_concurrency"]
        holds = [gateway.estimate_request_tokens(b) + b["max_tokens"] for b in bodies]
        limit = policy["daily_token_limit"]
        token_cap = min(limit, policy["tpm"] or limit)
        if policy["token_policy"] != "admit":
            assert charged <= token_cap - 1 + max(holds)
        if policy["token_policy"] == "strict":  # a hard cap: the model uses what it is sent
            assert charged <= limit
        # exact where nothing else can bind: all the calls' holds fit under the token limits
        if not policy["max_concurrency"] and sum(holds) < token_cap:
            assert n_ok == min(len(calls), policy["daily_request_limit"], policy["rpm"] or 99)
        # the next call meets the first limit reached, in the journal's order
        if n_ok >= policy["daily_request_limit"]:
            expected = "daily_request_limit_exceeded"
        elif charged >= limit:
            expected = "daily_token_limit_exceeded"
        elif policy["rpm"] and n_ok >= policy["rpm"]:
            expected = "rpm_limit_exceeded"
        elif policy["tpm"] and charged >= policy["tpm"]:
            expected = "tpm_limit_exceeded"
        elif (
            policy["token_policy"] == "strict"
            and gateway.estimate_request_tokens(chat(max_tokens=1)) >= limit - charged
        ):  # strict, checked last: a prompt that fills what is left leaves no room to answer
            expected = "daily_token_limit_exceeded"
        else:
            expected = ""
        status, doc, _ = await client.call(chat(max_tokens=1), key=key_of(name), path=CHAT)
        if expected:
            assert (status, code_of(CHAT, doc)) == (429, expected), doc
        else:
            assert status == 200, doc
    finally:
        await senv.stop(senv.gateways[-1])
