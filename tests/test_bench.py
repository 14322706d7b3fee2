"""`bitmig bench --quick --json` runs every scenario and reports every figure (not speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MACHINE = {"cpu", "cores", "ram_bytes", "kernel", "python", "numpy", "msgpack", "state_dir_fs",
           "loadavg_at_start", "loadavg_at_end"}
COMMON = {"target", "met", "bench_s"}
SCENARIOS = {
    "throughput": {"bitmap_bytes", "pattern", "raw_tcp_s", "raw_tcp_gbps", "bitmig_s",
                   "bitmig_gbps", "bitmig_bulk_phase_gbps", "ratio", "bytes_sent", "phases",
                   "ok"},
    "downtime": {"bitmap_bytes", "dirty_at_start", "write_rate", "achieved_write_rate",
                 "bitmig_downtime_ms", "stop_and_copy_downtime_ms", "downtime_ratio",
                 "bytes_ratio", "passes", "forced", "bitmig_duration_s",
                 "stop_and_copy_duration_s", "bitmig_bytes_sent", "stop_and_copy_bytes_sent",
                 "ok"},
    "wire_bytes": {"disk", "patterns"},
    "slow_link": {"disk", "granularity", "bitmap_bytes", "link_bytes_per_s", "write_rate",
                  "dirty_at_start", "duration_s", "limit_s", "ideal_s", "downtime_ms",
                  "passes", "forced", "bytes_sent", "bytes_ratio", "ok"},
    "memory": {"sizes"},
    "scale": {"sizes", "median_gbps"},
}
PATTERN = {"pattern", "raw", "bitmig", "roaring", "zlib1", "frames", "bitmig_vs_roaring",
           "bitmig_vs_raw", "met"}
PATTERNS = {"random p=0.0001", "random p=0.001", "random p=0.01", "random p=0.1",
            "random p=0.5", "1,000 runs x 64 bits", "100 runs x 4,096 bits", "all ones",
            "all zeros"}
SIZE = {"bitmap_bytes", "ok", "duration_s", "gbps", "source_peak_rss", "dest_peak_rss",
        "source_peak_x", "dest_peak_x", "limit_rss", "met"}


@pytest.fixture(scope="module")
def report() -> dict:
    p = subprocess.run([sys.executable, "-m", "bitmig", "bench", "--quick", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.stdout, p.stderr
    return json.loads(p.stdout)


def test_machine(report: dict) -> None:
    assert MACHINE <= set(report["machine"])


def test_every_scenario_and_figure(report: dict) -> None:
    sc = report["scenarios"]
    assert set(sc) == set(SCENARIOS)
    for name, keys in SCENARIOS.items():
        missing = (keys | COMMON) - set(sc[name])
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert isinstance(sc[name]["met"], bool)
        assert isinstance(sc[name]["target"], str) and sc[name]["target"]


def test_tables(report: dict) -> None:
    rows = report["scenarios"]["wire_bytes"]["patterns"]
    assert {r["pattern"] for r in rows} == PATTERNS
    for r in rows:
        assert PATTERN <= set(r)
    for name in ("memory", "scale"):
        sizes = report["scenarios"][name]["sizes"]
        assert len(sizes) >= 2
        for r in sizes:
            assert SIZE <= set(r)


def test_migrations_succeed(report: dict) -> None:
    sc = report["scenarios"]
    for name in ("throughput", "downtime", "slow_link"):
        assert sc[name]["ok"], name
    for name in ("memory", "scale"):
        assert all(r["ok"] for r in sc[name]["sizes"]), name
