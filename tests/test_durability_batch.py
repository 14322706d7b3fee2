"""Crash safety of the group commit (bitmig.core.store.commit_batch): a process storing
rounds of bitmaps in batches is killed at every step of a batch; what it left loads, and
holds for each bitmap either what the last finished batch stored or what a later batch
was storing, never a damaged or older file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitmig.core.store import TMP_MARK, Store

CHILD = Path(__file__).with_name("batchchild.py")
NAMES, ROUNDS = 12, 6  # as in batchchild.py


def run_child(state: Path, log: Path, step: str, n: int) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, str(CHILD), str(state), str(log), step, str(n)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, -9), p.stderr
    return p.returncode


def check(state: Path, log: Path) -> dict[str, str]:
    """Every stored file is valid; a bitmap holds its last "done" digest or one tried
    after it. Returns name -> stored digest."""
    tried: dict[str, list[str]] = {}
    done: dict[str, int] = {}  # name -> index in tried of the last digest stored
    for line in log.read_text().splitlines():
        what, name, digest = line.split()
        if what == "try":
            tried.setdefault(name, []).append(digest)
        else:
            done[name] = tried[name].index(digest)
    store = Store(state)  # a daemon starting: temp files of the killed batch go
    assert not [p for p in store.dir.iterdir() if TMP_MARK in p.name]
    good, bad = store.load_all()
    assert not bad, bad
    held = {m.name: m.digest.hex() for m, _ in good}
    for name, k in done.items():
        assert name in held, f"{name} was stored, now lost"
        assert held[name] in tried[name][k:], f"{name}: an older or unknown copy"
    for name, digest in held.items():
        assert digest in tried.get(name, []), f"{name}: never tried"
    return held


@pytest.mark.parametrize("step", ["seal", "flush", "publish", "dirsync"])
def test_kill_at_every_step_of_a_batch(tmp_path: Path, step: str) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    # The first call of the step (nothing stored yet), one in the middle of a batch,
    # one in a later batch (replacing stored copies); dirsync runs once per batch.
    points = [1, 2, ROUNDS - 1] if step == "dirsync" else [1, NAMES // 2, NAMES + 5]
    killed = 0
    for n in points:
        killed += run_child(state, log, step, n) == -9
        check(state, log)
    assert killed == len(points)
    # A run left alone stores every bitmap.
    assert run_child(state, log, step, 10**6) == 0
    assert len(check(state, log)) == NAMES
