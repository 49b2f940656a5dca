"""/metrics: Prometheus text format, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json

from conftest import ALICE_KEY, BOB_KEY, Client, Env
from prometheus_client.parser import text_string_to_metric_families

ADMIN_KEY = "admin-CANARY-0123456789"


async def scrape(client: Client, key: str | None = ADMIN_KEY) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await client.http.fetch(client.base + "/metrics", headers=headers, raise_error=False)
    return resp.code, resp.body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_counters_match_the_calls_made(env: Env) -> None:
    env.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 6}})
    env.upstream.delay = 0.01
    client = await env.start(admin_key=ADMIN_KEY)
    results = await asyncio.gather(
        *(client.call() for _ in range(10)),  # 6 charged, 4 over the limit
        *(client.call(key=BOB_KEY) for _ in range(3)),  # unknown key
        client.call(raw=b"[]"),
    )
    assert sorted(r[0] for r in results) == [200] * 6 + [400] + [401] * 3 + [429] * 4
    code, text = await scrape(client)
    assert code == 200
    m = samples(text)

    def get(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert get("gateway_requests_total", user="alice", model="gpt-3.5-turbo", status="200") == 6
    assert get("gateway_requests_total", user="alice", model="", status="429") == 4
    assert get("gateway_requests_total", user="", model="", status="401") == 3
    assert get("gateway_requests_total", user="alice", model="", status="400") == 1
    assert get("gateway_tokens_total", user="alice", model="gpt-3.5-turbo", kind="prompt") == 60
    assert get("gateway_tokens_total", user="alice", model="gpt-3.5-turbo", kind="completion") == 30
    assert get("gateway_rejections_total", reason="daily_request_limit_exceeded") == 4
    assert get("gateway_rejections_total", reason="invalid_api_key") == 3
    assert get("gateway_rejections_total", reason="invalid_request") == 1
    assert get("gateway_upstream_latency_seconds_count") == 6
    assert get("gateway_upstream_latency_seconds_bucket", le="+Inf") == 6
    assert get("gateway_upstream_latency_seconds_bucket", le="0.05") <= 6
    assert get("gateway_upstream_latency_seconds_sum") >= 0.06
    assert get("gateway_today_requests") == 6 and get("gateway_today_tokens") == 90
    assert get("gateway_queue_length") == 0 and get("gateway_in_flight") == 0
    assert get("gateway_users") == 1
    # The call log counts the same calls, but for the 3 that never authenticated.
    (log,) = (env.data_dir / "calls").glob("*.jsonl")
    assert len(log.read_text().splitlines()) == 11
    assert ADMIN_KEY not in text and ALICE_KEY not in text


async def test_queue_and_in_flight_gauges_while_busy(env: Env) -> None:
    env.upstream.delay = 0.5
    client = await env.start(admin_key=ADMIN_KEY, concurrency=2, queue_size=10)
    calls = [asyncio.ensure_future(client.call()) for _ in range(5)]
    await asyncio.sleep(0.25)
    m = samples((await scrape(client))[1])
    assert m[("gateway_in_flight", ())] == 2
    assert m[("gateway_queue_length", ())] == 3
    assert m[("gateway_queue_size", ())] == 10
    assert [c for c, _, _ in await asyncio.gather(*calls)] == [200] * 5


async def test_metrics_need_the_admin_key(env: Env) -> None:
    client = await env.start(admin_key=ADMIN_KEY)
    for key in (None, "wrong-admin-key-123", ALICE_KEY):
        code, text = await scrape(client, key)
        assert code == 401
        assert json.loads(text)["success"] is False
    resp = await client.http.fetch(client.base + "/metrics", raise_error=False)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_metrics_are_off_without_an_admin_key(env: Env) -> None:
    client = await env.start()
    code, text = await scrape(client, "anything-at-all")
    assert code == 404 and json.loads(text)["message"] == "接口不存在"
