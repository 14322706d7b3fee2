"""`bitmig trace summary` agrees with what `bitmig demo` itself reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_demo

from bitmig.tools.trace_records import read_trace, summarize


def summary_cli(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bitmig", "trace", "summary", str(path),
                          "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("extra", [
    # writes during the migration: bulk, a dirty pass or a few (at most 8), completion
    ("--write-rate", "1000", "--max-passes", "8"),
    ("--dirty", "0", "--write-rate", "0"),  # a clean bitmap: zeroes frames only
])
def test_summary_agrees_with_demo(tmp_path: Path, extra: tuple[str, ...]) -> None:
    trace = tmp_path / "t.jsonl"
    demo = run_demo(trace, "--disk-size", "2T", *extra)
    check_summary(trace, demo)
    if "0" in extra:
        assert demo["zero_runs"] >= 1 and "bits" not in demo["frames"]


def test_summary_agrees_with_demo_of_forced_passes(forced_demo: tuple[Path, dict]) -> None:
    trace, demo = forced_demo
    check_summary(trace, demo)
    assert demo["passes"] == 3 and demo["forced"]


def check_summary(trace: Path, demo: dict) -> None:
    s = summary_cli(trace)
    assert s["bytes_sent"] == demo["bytes_sent"]
    assert s["passes"] == demo["passes"]
    assert s["forced"] == demo["forced"]
    assert round(s["downtime_ms"], 3) == demo["downtime_ms"]
    assert s["zero_runs"] == demo["zero_runs"]
    assert s["chunks_sent"] == demo["chunks_sent"]
    assert s["outcome"] == "ok"
    assert s["frames_sent"] == demo["frames"]  # every kind the source sent
    assert s["frames_sent"]["complete"] == demo_bitmaps(demo)
    # both directions, per phase, add up to the whole trace
    frames = [r for r in read_trace(str(trace)) if r["type"] == "frame"]
    assert sum(p["frames"] for p in s["phases"].values()) == len(frames)
    # the destination's trace tells the same story about what the source sent
    d = summarize(read_trace(str(trace) + ".dest"))
    for k in ("bytes_sent", "frames_sent", "chunks_sent", "zero_runs"):
        assert d[k] == s[k], k


def demo_bitmaps(demo: dict) -> int:
    return len(demo["digests"])
