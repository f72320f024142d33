"""The benchmark harness runs end to end at tiny sizes, so it cannot rot (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_benchmark_harness_smoke(tmp_path: object) -> None:
    """benchmarks/run.py --smoke checks every method against the loop and writes its JSON."""
    out = os.path.join(str(tmp_path), "bench.json")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "run.py"),
            "--smoke",
            "--no-chart",
            "--no-dask",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        data = json.load(f)
    assert set(data["workloads"]) == {"W1", "W2", "W3a", "W3b"}
    for w in data["workloads"].values():
        assert "plain loop" in w["median_s"] and "pm loky" in w["median_s"]
