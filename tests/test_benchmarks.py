"""The benchmark scripts keep working (tiny sizes; the recorded numbers come from full runs, see benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_cache_throughput_smoke():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cache_throughput.py"), "--sizes", "10", "20", "--no-record"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'images': 20, 'items_encoded': 40" in out.stdout and "peak RSS 20 / 10 images" in out.stdout


def test_train_overhead_smoke():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_overhead.py"), "--steps", "12", "--no-record"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"ratio"' in out.stdout and '"steps_measured": 18' in out.stdout
