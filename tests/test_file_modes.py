"""Issue 9 item 9: what the daemons create is private under any umask: directories 0700
(state dir, bitmaps/, the control socket's parent), files 0600 (bitmaps, trace, socket)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bitmig.daemon.control import call


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _start(args: list[str], ready: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "bitmig", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0))
    line = p.stdout.readline()
    assert line.startswith(ready), (line, p.stderr.read() if p.poll() is not None else "")
    return p


@pytest.mark.parametrize("side", ["dest", "source"])
def test_created_paths_are_private_under_umask_000(tmp_path: Path, side: str) -> None:
    os.chmod(tmp_path, 0o755)  # an existing parent: left as it is
    state = tmp_path / "new" / "deeper" / "state"
    ctl = tmp_path / "run" / "bitmig" / "ctl.sock"
    trace = tmp_path / "trace.jsonl"
    args = [side, "--state-dir", str(state), "--control", str(ctl), "--trace", str(trace)]
    if side == "dest":
        args += ["--listen", "127.0.0.1:0"]
    p = _start(args, "listening" if side == "dest" else "control")
    try:
        call(str(ctl), "add", node="n", name="b", disk_size="1G", fill=0.1)
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    dirs = [tmp_path / "new", tmp_path / "new" / "deeper", state, state / "bitmaps",
            tmp_path / "run", tmp_path / "run" / "bitmig"]
    assert {str(d.relative_to(tmp_path)): oct(_mode(d)) for d in dirs} == {
        str(d.relative_to(tmp_path)): "0o700" for d in dirs}
    files = list((state / "bitmaps").iterdir())
    assert len(files) == 1  # the bitmap stored at exit
    assert [oct(_mode(f)) for f in files] == ["0o600"]
    assert oct(_mode(trace)) == "0o600"
    assert oct(_mode(tmp_path)) == "0o755"


def test_existing_trace_file_keeps_its_mode(tmp_path: Path) -> None:
    from bitmig.daemon.trace_writer import Trace

    trace = tmp_path / "t.jsonl"
    trace.write_text("")
    os.chmod(trace, 0o640)
    t = Trace(str(trace), "source")
    t.event("x")
    t.close()
    assert oct(_mode(trace)) == "0o640" and trace.read_text().count("\n") == 1
