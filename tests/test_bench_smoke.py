"""The benchmark's smoke mode runs end to end (a few seconds), so bench/ cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--tool=python", f"--out={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "latest.json").read_text())
    sections = {r["section"] for r in rows}
    assert sections == {"relay", "stream", "users", "2procs", "streams"}
    assert all(r.get("errors", 0) == 0 for r in rows)
    two = next(r for r in rows if r["label"] == "two processes, one data dir")
    assert two["limit_exact"] is True
    streams = next(r for r in rows if r["section"] == "streams")
    assert streams["completed"] == streams["conns"]
    assert streams["steady_probes"] > 0
    report = (tmp_path / "latest.md").read_text()
    assert "| target | measured | goal |" in report
