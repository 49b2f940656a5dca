"""/admin: login with a signed HttpOnly cookie, XSRF-protected actions, and the page in Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ALICE_KEY,
    ALL_SECRETS,
    BOB_KEY,
    KEY_ENV,
    ROOT,
    Client,
    Env,
    data_text,
    proc_args,
)
from playwright.async_api import async_playwright

ADMIN_KEY = "admin-CANARY-0123456789"
ARTIFACTS = ROOT / "test-artifacts"


class Browser:
    """A minimal cookie-keeping HTTP client for the admin routes."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    async def request(
        self, path: str, method: str = "GET", body: str | None = None, **headers: str
    ) -> tuple[int, str, Any]:
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method == "POST":
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        resp = await self.client.http.fetch(
            self.client.base + path,
            method=method,
            body=body if method == "POST" else None,
            headers=h,
            follow_redirects=False,
            raise_error=False,
        )
        for line in resp.headers.get_list("Set-Cookie"):
            self.set_cookie_headers.append(line)
            name, value = line.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value.strip('"')
        return resp.code, resp.body.decode(), resp.headers

    async def xsrf(self) -> str:
        code, html, _ = await self.request("/admin")
        assert code == 200
        return re.search(r'name="_xsrf" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]

    async def login(self, key: str = ADMIN_KEY) -> int:
        token = await self.xsrf()
        code, _, _ = await self.request("/admin/login", "POST", f"_xsrf={token}&key={key}")
        return code


async def test_admin_is_off_without_an_admin_key(env: Env) -> None:
    client = await env.start()
    for path in ("/admin", "/admin/api/state"):
        code, body, _ = await Browser(client).request(path)
        assert code == 404 and json.loads(body)["message"] == "接口不存在"


async def test_login_sets_a_signed_httponly_cookie(env: Env) -> None:
    client = await env.start(admin_key=ADMIN_KEY)
    b = Browser(client)
    code, html, headers = await b.request("/admin")
    assert code == 200 and 'type="password"' in html and ADMIN_KEY not in html
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert await b.login() == 303
    session = next(c for c in b.set_cookie_headers if c.startswith("gateway_admin="))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert ADMIN_KEY not in session
    code, body, _ = await b.request("/admin/api/state")
    assert code == 200
    state = json.loads(body)["data"]
    assert [u["name"] for u in state["users"]] == ["alice", "bob", "carol"]
    assert len(state["history"]) == 14
    code, html, _ = await b.request("/admin")
    assert 'id="history"' in html  # the dashboard now, not the form


async def test_wrong_key_missing_cookie_and_forged_cookie_are_refused(env: Env) -> None:
    client = await env.start(admin_key=ADMIN_KEY)
    b = Browser(client)
    assert await b.login("not-the-admin-key") == 403
    assert "gateway_admin" not in b.cookies
    assert (await b.request("/admin/api/state"))[0] == 401
    b.cookies["gateway_admin"] = "admin"  # unsigned
    assert (await b.request("/admin/api/state"))[0] == 401
    # A cookie signed under another admin key stops working when the key changes.
    other = await env.start(admin_key="another-admin-key-456")
    o = Browser(other)
    assert await o.login("another-admin-key-456") == 303
    b.cookies["gateway_admin"] = o.cookies["gateway_admin"]
    assert (await b.request("/admin/api/state"))[0] == 401
    # Logging in needs the XSRF token too (no login CSRF).
    fresh = Browser(client)
    code, body, _ = await fresh.request("/admin/login", "POST", f"key={ADMIN_KEY}")
    assert code == 403 and json.loads(body)["message"] == "无权访问"


async def test_actions_need_the_xsrf_token_and_our_origin(env: Env) -> None:
    client = await env.start(admin_key=ADMIN_KEY)
    b = Browser(client)
    assert await b.login() == 303
    token = await b.xsrf()
    action = "/admin/api/users/alice/disable"
    assert (await b.request(action, "POST", ""))[0] == 403  # no token
    assert (await b.request(action, "POST", "", X_XSRFToken="2|00|00|00"))[0] == 403
    code, _, _ = await b.request(action, "POST", "", X_XSRFToken=token, Origin="https://evil.test")
    assert code == 403
    assert env.gateways[0].users.by_name["alice"].enabled  # nothing changed
    assert (await Browser(client).request(action, "POST", "", X_XSRFToken=token))[0] in (401, 403)

    code, body, _ = await b.request(action, "POST", "", X_XSRFToken=token)
    assert code == 200, body
    assert yaml.safe_load(env.users_file.read_text())["users"]["alice"]["enabled"] is False
    assert (await client.call())[0] == 401  # in force at once, no reload wait
    code, _, _ = await b.request("/admin/api/users/alice/enable", "POST", "", X_XSRFToken=token)
    assert code == 200
    assert (await client.call())[0] == 200
    code, _, _ = await b.request("/admin/api/users/alice/reset", "POST", "", X_XSRFToken=token)
    assert code == 200
    state = json.loads((await b.request("/admin/api/state"))[1])["data"]
    alice = next(u for u in state["users"] if u["name"] == "alice")
    assert (alice["requests"], alice["tokens"]) == (0, 0)
    assert state["history"][-1]["requests"] == 1  # usage history keeps what was used
    code, _, _ = await b.request("/admin/api/users/nobody/reset", "POST", "", X_XSRFToken=token)
    assert code == 404


async def test_actions_on_a_user_whose_name_needs_escaping(env: Env) -> None:
    name = "ann / 王 100%"
    env.write_users({name: {"api_key": ALICE_KEY}})
    client = await env.start(admin_key=ADMIN_KEY)
    b = Browser(client)
    assert await b.login() == 303
    token = await b.xsrf()
    path = f"/admin/api/users/{urllib.parse.quote(name, safe='')}/disable"
    code, body, _ = await b.request(path, "POST", "", X_XSRFToken=token)
    assert code == 200, body
    assert yaml.safe_load(env.users_file.read_text())["users"][name]["enabled"] is False


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (.ci/run); it is missing")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


async def launch_chromium(p: Any, executable: str) -> Any:
    """Headless Debian Chromium through playwright, with nothing reaching the network."""
    return await p.chromium.launch(
        executable_path=executable,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


async def admin_page(browser: Any, client: Client, height: int = 900) -> Any:
    """A page logged in to the dashboard through its form, once the state has drawn."""
    page = await browser.new_page(viewport={"width": 1200, "height": height})
    await page.goto(client.base + "/admin")
    await page.fill("#key", ADMIN_KEY)
    await page.click("button[type=submit]")
    await page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
    return page


@pytest.mark.slow
async def test_dashboard_in_headless_chromium(env: Env, tmp_path: Path) -> None:
    chromium = _chromium()
    env.write_users(
        {
            "alice": {"api_key": ALICE_KEY, "daily_request_limit": 20},
            "bob": {"api_key": BOB_KEY, "daily_request_limit": 10, "enabled": False},
            "carol": {"api_key_sha256": "ab" * 32, "daily_token_limit": 1000},
        }
    )
    client = await env.start(admin_key=ADMIN_KEY)
    for _ in range(5):
        assert (await client.call())[0] == 200
    assert (await client.call(key=BOB_KEY))[0] == 401  # no key, no line: not in the list
    assert (await client.call({"model": "gpt-3.5-turbo"}))[0] == 400  # alice's bad request
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await launch_chromium(p, chromium)
        try:
            page = await admin_page(browser, client, height=1100)
            assert ADMIN_KEY not in page.url

            # alice's requests bar: 5 of 20.
            fill = page.locator(".card[data-user='alice'] .metric.requests .fill")
            assert await fill.get_attribute("data-share") == "0.250"
            box = await fill.bounding_box()
            track_locator = page.locator(".card[data-user='alice'] .metric.requests .track")
            track = await track_locator.bounding_box()
            assert box and track and abs(box["width"] / track["width"] - 0.25) < 0.02
            assert "5 / 20" in await page.locator(".card[data-user='alice']").inner_text()
            assert "disabled" in await page.locator(".card[data-user='bob'] .badge").inner_text()

            # The 14-day chart: 14 bars, today's the only one with requests, tallest.
            bars = page.locator("svg#history rect.day")
            assert await bars.count() == 14
            assert await bars.nth(13).get_attribute("data-requests") == "5"
            heights = [float(await bars.nth(i).get_attribute("height") or 0) for i in range(14)]
            assert heights[13] > 100 and heights[:13] == [0.0] * 13
            assert await page.locator("#tokens-line").count() == 1

            # The failed call is listed with its status and reason.
            failures = await page.locator("#failures").inner_text()
            assert "400" in failures and "invalid_request" in failures
            assert "401" not in failures
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # An action from the page: disable alice.
            await page.locator(".card[data-user='alice'] button", has_text="disable").click()
            await page.wait_for_selector(".card[data-user='alice'] .badge.off", timeout=5_000)
            assert not env.gateways[0].users.by_name["alice"].enabled
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.locator(".card[data-user='alice'] button", has_text="reset today").click()
            await page.wait_for_selector(
                ".card[data-user='alice'] .metric.requests .fill[data-share='0.000']",
                state="attached",  # an empty bar has no width, so it is never "visible"
                timeout=5_000,
            )
            content = await page.content()
        finally:
            await browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    for secret in ALL_SECRETS:
        assert secret not in content


async def test_admin_key_stays_out_of_a_process_log(penv: Env, procs, tmp_path: Path) -> None:
    gw = procs(
        proc_args(penv, "--logging=debug"),
        tmp_path / "gw.log",
        {**KEY_ENV, "GATEWAY_ADMIN_KEY": ADMIN_KEY},
    )
    await gw.ready()
    b = Browser(Client(gw.base, penv.http))
    assert await b.login("wrong-admin-key-0000") == 403
    assert await b.login() == 303
    assert (await b.request("/admin/api/state"))[0] == 200
    resp = await penv.http.fetch(
        gw.base + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert resp.code == 200
    gw.kill(signal.SIGTERM)
    assert await gw.wait() == 0
    text = gw.log_path.read_text()
    assert "admin login refused" in text
    for secret in (ADMIN_KEY, *ALL_SECRETS):
        assert secret not in text
        assert secret not in data_text(penv.data_dir)
