"""benchmarks/dashboard_refresh.py keeps working (a small size, in process; the recorded numbers come from a full
run of the script)."""

from __future__ import annotations

import importlib.util

from tests.ui_support import REPO


def test_dashboard_refresh_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("dashboard_refresh", REPO / "benchmarks" / "dashboard_refresh.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.measure(100, 1, tmp_path)
    assert result["steps"] == 100 and result["events_mib"] > 0
    for key in ("handlers_first_load_ms", "handlers_refresh_ms_median", "handlers_idle_refresh_ms_median",
                "http_first_load_ms", "http_refresh_ms_median", "http_idle_refresh_ms_median",
                "http_two_empty_requests_ms_median", "full_reread_ms"):
        assert result[key] > 0, key
