"""A `bitmig dest` subprocess for tests (127.0.0.1 only), killable with SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path


class DestProcess:
    """A `bitmig dest` subprocess on 127.0.0.1 with a state directory."""

    def __init__(self, state: Path, tmp: Path) -> None:
        self.state, self.tmp = state, tmp
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> int:
        self.starts += 1
        ctl = self.tmp / f"ctl{self.starts}.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitmig", "dest", "--listen", "127.0.0.1:0",
             "--state-dir", str(self.state), "--control", str(ctl), "--io-timeout", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "listening on HOST:PORT ..."
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.port = int(m.group(1))
        return self.port

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> str:
        """Stop gracefully; return stderr."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.stderr.read()
