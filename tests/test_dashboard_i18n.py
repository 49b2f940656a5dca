"""The dashboard in Chinese and English: chosen from the browser's Accept-Language, switched
with ?lang=zh-CN|en; every word of the page in both (the Chinese page has no English word
left but names and units), numbers in the language's format; and in headless Chromium, both
languages drawn, with screenshots in test-artifacts/."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ALICE_KEY, ROOT, Env
from test_admin_web import ADMIN_KEY, Browser, _chromium, admin_page, launch_chromium

import gateway

ARTIFACTS = ROOT / "test-artifacts"
# Words that stay as they are in Chinese: names, units and the language switch.
KEPT = {"p", "English", "Token", "LLM", "s", "ms", "USD"}  # p50, p95; units; --currency


class Text(HTMLParser):
    """The visible text of a page: outside <script> and <style>."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = 0
        self.words: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.skip += tag in ("script", "style", "title")

    def handle_endtag(self, tag: str) -> None:
        self.skip -= tag in ("script", "style", "title")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.words += re.findall(r"[A-Za-z][A-Za-z']*", data)


def english_words(html: str) -> set[str]:
    parser = Text()
    parser.feed(html)
    return set(parser.words) - KEPT


@pytest.mark.parametrize("page", ["DASHBOARD_PAGE", "LOGIN_PAGE"])
def test_every_word_of_the_page_is_translated(page: str) -> None:
    html = getattr(gateway, page).replace("{{message}}", "<span>Wrong admin key.</span>")
    assert english_words(gateway.translate_page(html, "zh-CN")) == set()
    assert len(english_words(gateway.translate_page(html, "en"))) >= 3
    # The script's words: every literal it passes to t() has a translation.
    script = gateway.DASHBOARD_PAGE
    for word in re.findall(r't\("((?:[^"\\]|\\.)*)"\)', script):
        assert word.replace("\\'", "'") in gateway.DASHBOARD_ZH, word
    for state in ("running", "stopping", "store_unavailable", "ok", "resting", "disabled"):
        assert state in gateway.DASHBOARD_ZH


def test_the_language_is_chosen_from_the_browser_and_the_switch() -> None:
    choose = gateway.page_language
    assert choose(None, "zh-CN,zh;q=0.9,en;q=0.8") == "zh-CN"
    assert choose(None, "zh-TW") == "zh-CN"
    assert choose(None, "en-US,en;q=0.9") == "en"
    assert choose(None, "fr-FR, zh;q=0.5") == "zh-CN"
    assert choose(None, "") == "en"
    assert choose("en", "zh-CN") == "en"
    assert choose("zh-CN", "en") == "zh-CN"
    assert choose("de", "zh-CN") == "zh-CN"  # an unknown switch value: the browser's


async def test_the_login_page_speaks_the_browsers_language(senv: Env) -> None:
    client = await senv.start(admin_key=ADMIN_KEY)
    browser = Browser(client)
    code, html, headers = await browser.request("/admin", Accept_Language="zh-CN,zh;q=0.9")
    assert code == 200 and '<html lang="zh-CN">' in html and "管理密钥" in html
    assert headers["Content-Language"] == "zh-CN"
    code, html, _ = await browser.request("/admin?lang=en", Accept_Language="zh-CN")
    assert '<html lang="en">' in html and "Admin key" in html
    code, html, _ = await browser.request("/admin")
    assert '<html lang="en">' in html


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["zh-CN", "en"])
async def test_the_dashboard_in_chromium(senv: Env, lang: str) -> None:
    chromium = _chromium()
    from playwright.async_api import async_playwright  # noqa: PLC0415

    senv.write_users({"alice": {"api_key": ALICE_KEY, "daily_request_limit": 12345}})
    client = await senv.start(admin_key=ADMIN_KEY)
    for _ in range(3):
        assert (await client.call())[0] == 200
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await launch_chromium(p, chromium)
        try:
            page = await admin_page(browser, client)
            await page.goto(client.base + f"/admin?lang={lang}")
            await page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
            text = await page.inner_text("body")
            shot = ARTIFACTS / f"dashboard-{lang}.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    assert shot.stat().st_size > 10_000
    if lang == "zh-CN":
        assert "今日用户" in text and "运行中" in text and "最近 14 天" in text
        assert "今日费用" in text and "0 USD" in text  # the cost columns (no prices set)
        assert "12,345" in text  # numbers in the language's format
        words = set(re.findall(r"[A-Za-z][A-Za-z']*", text))
        # Names stay: the user, the model, endpoints, upstreams, key fingerprints (sha256:…).
        kept = {k.lower() for k in KEPT}
        names = {"alice", "gpt", "turbo", "api", "call", "php", "default", "anthropic", "sha"}
        fingerprints = " ".join(re.findall(r"sha256:[0-9a-f]+", text))
        left = {w for w in words if w.lower() not in kept | names and w not in fingerprints}
        assert left == set(), left
    else:
        assert "Users today" in text and "running" in text and "12,345" in text
    assert Path(shot).exists()
