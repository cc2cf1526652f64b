"""The serving benchmark still runs (CI size) and reports no failed request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serving_swap_bench_runs_small_with_no_failed_request(tmp_path):
    out = tmp_path / "serving_swap.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serving_swap.py"), "--small", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed_requests"] == 0
    assert report["notified_swaps"]["to_first_request"]["n"] == 6
