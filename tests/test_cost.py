"""What each person costs: prices per million tokens (upstreams.yaml `prices:` or
--prices-file), each charged call's cost in the call log (cached prompt tokens at their own
price; unpriced models marked), and `usage --by user|model|day` whose totals agree to the cent
with the call log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALICE_KEY, ROOT, Env

import gateway

BOB_KEY = "sk-bob-cost-00000001"


def test_a_call_costs_its_tokens_at_the_first_matching_price() -> None:
    prices = gateway.parse_prices(
        {
            "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached_input": 0.075},
            "gpt-4o*": {"input": 2.5, "output": 10},
            "deepseek-*": {"input": 0.27, "output": 1.10},
        }
    )
    usage = gateway.Usage(1000, 500, 1500, cached_tokens=400)
    # 600 fresh x 0.15 + 400 cached x 0.075 + 500 x 0.60, per million
    assert gateway.cost_of(prices, "gpt-4o-mini", usage) == pytest.approx(0.00042)
    assert gateway.cost_of(prices, "gpt-4o", usage) == pytest.approx(0.0075)  # cached at input
    assert gateway.cost_of(prices, "llama3", usage) is None  # unpriced
    for bad in ({"m": {"input": 1}}, {"m": {"input": -1, "output": 1}}, {"m": 3}, ["m"]):
        with pytest.raises(gateway.ConfigError):
            gateway.parse_prices(bad)


def test_cached_prompt_tokens_are_read_from_each_api() -> None:
    openai = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    responses = {
        "input_tokens": 100,
        "output_tokens": 5,
        "input_tokens_details": {"cached_tokens": 30},
    }
    anthropic = {"input_tokens": 10, "cache_read_input_tokens": 80, "output_tokens": 5}
    assert gateway._exact_usage(openai).cached_tokens == 60
    assert gateway._exact_usage(responses).cached_tokens == 30
    used = gateway._exact_usage(anthropic)
    assert (used.prompt_tokens, used.cached_tokens) == (90, 80)


async def test_usage_by_user_and_model_agrees_with_the_call_log_to_the_cent(senv: Env) -> None:
    senv.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": BOB_KEY}})
    routing = senv.tmp / "upstreams.yaml"
    routing.write_text(
        "upstreams:\n"
        f"  main: {{base_url: '{senv.upstream.url}', api_key: sk-up-cost-0001}}\n"
        "models: {cheap: gpt-4o-mini}\n"
        "prices:\n"
        '  "gpt-4o-mini": {input: 0.15, output: 0.60}\n'
        '  "gpt-4o*": {input: 2.5, output: 10.0}\n'
    )
    senv.upstream.usage = {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}
    client = await senv.start(upstreams_file=str(routing))
    plan = [(ALICE_KEY, "gpt-4o")] * 3 + [(ALICE_KEY, "cheap")] * 2 + [(BOB_KEY, "llama3")] * 2
    plan += [(BOB_KEY, "gpt-4o-mini")] * 4
    for key, model in plan:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        status, doc, _ = await client.call(body, key=key)
        assert status == 200, doc
    await senv.stop()
    lines = [
        json.loads(x)
        for p in (senv.data_dir / "calls").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    assert len(lines) == len(plan)
    big = (1234 * 2.5 + 567 * 10.0) / 1e6
    small = (1234 * 0.15 + 567 * 0.60) / 1e6
    assert sorted(round(x["cost"], 8) for x in lines if x["cost"] is not None) == sorted(
        [round(big, 8)] * 3 + [round(small, 8)] * 6
    )
    assert [x["model"] for x in lines if x["cost"] is None] == ["llama3", "llama3"]
    env = {
        **os.environ,
        "GATEWAY_USERS_FILE": str(senv.users_file),
        "GATEWAY_DATA_DIR": str(senv.data_dir),
        "GATEWAY_TIMEZONE": "Asia/Shanghai",
    }

    def usage(*argv: str) -> list[dict]:
        done = subprocess.run(
            [sys.executable, str(ROOT / "gateway.py"), "usage", *argv, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    by_user = {r["user"]: r for r in usage("--by", "user")}
    assert by_user["alice"]["requests"] == 5 and by_user["bob"]["requests"] == 6
    assert round(by_user["alice"]["cost"], 2) == round(3 * big + 2 * small, 2)
    assert round(by_user["bob"]["cost"], 2) == round(4 * small, 2)
    assert by_user["bob"]["unpriced"] == 2
    by_model = {(r["user"], r["model"]): r for r in usage("--by", "user,model")}
    assert by_model[("alice", "cheap")]["requests"] == 2  # the name the client sent
    total = sum(r["cost"] for r in usage("--by", "day"))
    assert round(total, 2) == round(sum(x["cost"] or 0 for x in lines), 2)
    assert sum(r["tokens"] for r in usage("--by", "model")) == 1801 * len(plan)
    plain = usage()  # date, user, requests, tokens (the counters) and cost (the call log)
    assert {r["user"]: r["cost"] for r in plain} == {
        u: round(r["cost"], 6) for u, r in by_user.items()
    }
    month = usage("--month", lines[0]["time"][:7], "--by", "user")
    assert sorted(month, key=str) == sorted(by_user.values(), key=str)


def test_a_prices_file_without_routing(tmp_path: Path) -> None:
    (tmp_path / "prices.yaml").write_text('"demo": {input: 1.0, output: 2.0}\n')
    assert gateway.load_prices_file(str(tmp_path / "prices.yaml"))[0].glob == "demo"
    (tmp_path / "bad.yaml").write_text('"demo": {input: 1.0}\n')
    with pytest.raises(gateway.ConfigError, match=r"bad\.yaml"):
        gateway.load_prices_file(str(tmp_path / "bad.yaml"))


async def test_the_dashboard_shows_todays_cost_per_user_and_model(senv: Env) -> None:
    from test_routing import ADMIN_KEY, Admin  # noqa: PLC0415 - its logged-in session helper

    senv.write_users({"alice": {"api_key": ALICE_KEY}, "bob": {"api_key": BOB_KEY}})
    prices = senv.tmp / "prices.yaml"
    prices.write_text('"gpt-4o*": {input: 2.5, output: 10.0}\n')
    senv.upstream.usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    client = await senv.start(admin_key=ADMIN_KEY, prices_file=str(prices), currency="CNY")
    for key, model in [(ALICE_KEY, "gpt-4o")] * 2 + [(BOB_KEY, "llama3")]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.call(body, key=key))[0] == 200
    admin = Admin(client)
    await admin.login()
    code, text = await admin.request("/admin/api/state")
    assert code == 200
    cost = json.loads(text)["data"]["cost"]
    one = (1000 * 2.5 + 100 * 10.0) / 1e6
    assert cost["currency"] == "CNY"
    assert cost["users"] == {"alice": pytest.approx(2 * one), "bob": 0.0}
    assert cost["models"] == {"gpt-4o": pytest.approx(2 * one), "llama3": 0.0}
    assert len(cost["days"]) == 14
    assert cost["history"]["gpt-4o"][-1] == [2, 2200, pytest.approx(2 * one)]
    assert cost["history"]["llama3"][:-1] == [[0, 0, 0.0]] * 13


async def test_the_dashboards_costs_read_only_what_the_call_log_gained(senv: Env) -> None:
    """Each poll reads on from where the last stopped (a busy day's log is not parsed again
    every 2 s); a log that shrank is read again from its start."""
    senv.write_users({"alice": {"api_key": ALICE_KEY}})
    prices = senv.tmp / "prices.yaml"
    prices.write_text('"m*": {input: 1.0, output: 1.0}\n')
    senv.upstream.usage = {"prompt_tokens": 500, "completion_tokens": 500, "total_tokens": 1000}
    client = await senv.start(prices_file=str(prices))
    service = senv.gateways[0].service
    assert service is not None
    today = service.clock.today()
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.call(body))[0] == 200
    first = await service.cost_report(today)
    assert first["users"] == {"alice": pytest.approx(0.001)}
    offset = service._cost_days[today][0]
    assert offset == service.calls.path(today).stat().st_size
    assert (await client.call(body))[0] == 200
    second = await service.cost_report(today)
    assert second["users"] == {"alice": pytest.approx(0.002)}
    assert service._cost_days[today][0] > offset
    path = service.calls.path(today)
    path.write_text(path.read_text().splitlines()[0] + "\n")  # shrank: one line left
    third = await service.cost_report(today)
    assert third["users"] == {"alice": pytest.approx(0.001)}
