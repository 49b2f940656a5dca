"""README.zh-CN.md is a full translation kept in step with README.md: the same sections in the
same order (by level, and the same code in their titles), the same code blocks (commands,
examples) character for character, and each links the other at the top."""

from __future__ import annotations

import re

from conftest import ROOT

EN = (ROOT / "README.md").read_text()
ZH = (ROOT / "README.zh-CN.md").read_text()
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)


def headings(text: str) -> list[tuple[int, list[str]]]:
    """(level, the `code` spans of the title) of each heading outside code blocks."""
    found = []
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            found.append((len(m.group(1)), re.findall(r"`([^`]+)`", m.group(2))))
    return found


def test_the_same_sections_in_the_same_order() -> None:
    en, zh = headings(EN), headings(ZH)
    assert len(en) > 20
    assert en == zh


def test_the_same_commands_and_examples() -> None:
    en, zh = FENCE.findall(EN), FENCE.findall(ZH)
    assert len(en) > 10
    assert en == zh


def test_each_links_the_other_at_the_top() -> None:
    assert "(README.zh-CN.md)" in "\n".join(EN.splitlines()[:5])
    assert "(README.md)" in "\n".join(ZH.splitlines()[:5])


def test_the_translation_is_chinese() -> None:
    """Prose, not a copy: most of the text outside code is CJK."""
    prose = FENCE.sub("", ZH)
    prose = re.sub(r"`[^`]*`|\([^)]*\)|https?://\S+", "", prose)
    cjk = len(re.findall(r"[\u4e00-\u9fff]", prose))
    assert cjk > 8000
