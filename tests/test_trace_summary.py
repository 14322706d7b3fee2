"""`bitmig trace summary` agrees with what `bitmig demo` itself reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitmig.tools.trace_records import read_trace, summarize


def run_demo(path: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bitmig", "demo", "--json", "--trace", str(path),
         "--disk-size", "2T", *extra], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def summary_cli(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bitmig", "trace", "summary", str(path),
                          "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("extra", [
    (),  # the defaults: bulk, then completion
    ("--dirty", "0", "--write-rate", "0"),  # a clean bitmap: zeroes frames only
    ("--dirty", "0.002", "--write-rate", "300000", "--downtime-ms", "1",
     "--max-passes", "3"),  # forced passes
])
def test_summary_agrees_with_demo(tmp_path: Path, extra: tuple[str, ...]) -> None:
    trace = tmp_path / "t.jsonl"
    demo = run_demo(trace, *extra)
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
    if "0" in extra:
        assert demo["zero_runs"] >= 1 and "bits" not in demo["frames"]
    if "--max-passes" in extra:
        assert demo["passes"] == 3 and demo["forced"]


def demo_bitmaps(demo: dict) -> int:
    return len(demo["digests"])
