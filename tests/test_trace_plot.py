"""`bitmig trace plot`: a PNG from a real trace, with something drawn on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bitmig.tools.trace_plot import series
from bitmig.tools.trace_records import read_trace

pytest.importorskip("matplotlib")


def test_plot_from_demo_trace(tmp_path: Path, forced_demo: tuple[Path, dict]) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    (trace, _), png = forced_demo, tmp_path / "t.png"
    s = series(read_trace(str(trace)))
    assert len(s["passes"]) == 3 and len(s["frozen"]) == 1 and s["pend_t"]
    assert s["frozen"][0][1] > s["frozen"][0][0]
    out = subprocess.run([sys.executable, "-m", "bitmig", "trace", "plot", str(trace), "-o",
                          str(png)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    img = mpimg.imread(str(png))
    assert img.shape[0] >= 400 and img.shape[1] >= 800
    rgb = img[..., :3]
    assert (rgb < 0.95).any(axis=2).mean() > 0.02  # not blank
    # the plotted colours are there: blue sent line, red pending, orange frozen shading
    def near(c: tuple[float, float, float]) -> int:
        return int((np.abs(rgb - np.array(c)).sum(axis=2) < 0.15).sum())
    assert near((0.122, 0.467, 0.706)) > 50  # tab:blue
    assert near((0.839, 0.153, 0.157)) > 50  # tab:red
    assert near((0.992, 0.827, 0.659)) > 500  # tab:orange at alpha 0.3 over white


def test_each_group_is_its_own_frozen_window() -> None:
    # Bitmaps complete in groups: each window runs from its completion phase to the end of
    # its group, not to the migration's end.
    recs = [{"mono": 0.0, "type": "phase", "phase": "setup"},
            {"mono": 1.0, "type": "phase", "phase": "completion", "pending_bytes": 10},
            {"mono": 1.02, "type": "group", "n": 1},
            {"mono": 1.5, "type": "phase", "phase": "completion", "pending_bytes": 10},
            {"mono": 1.53, "type": "group", "n": 2},
            {"mono": 2.0, "type": "phase", "phase": "done", "downtime_ms": 30.0}]
    assert series(recs)["frozen"] == [[1.0, 1.02], [1.5, 1.53]]
