"""ruff (lint and format) and mypy --strict on gateway.py run with the tests."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run(*argv: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_check() -> None:
    run("ruff", "check", ".")


def test_ruff_format() -> None:
    run("ruff", "format", "--check", ".")


def test_mypy_strict() -> None:
    run("mypy", "gateway.py")
