"""Test helper: a tcpdump capture on loopback that provably covers a stretch of traffic.

A capture can start late (tcpdump says "listening on" before the kernel delivers to it)
and a SIGINT can stop it before the packets still queued in its buffer are written. So
tcpdump also prints every packet it writes (`--print`), and a UDP marker datagram is
sent and awaited in that output when the capture starts and before it stops: every
packet sent before the closing marker was written. tcpdump's "N packets dropped by
kernel" must be 0, so a decode mismatch is never a capture loss.

Needs tcpdump 4.99+ and the right to capture on `lo` (root or CAP_NET_RAW).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# What troubleshooting.md tells a person to run, on lo: -B so a busy machine drops nothing.
TCPDUMP = ["tcpdump", "-i", "lo", "-n", "-s", "0", "-U", "-B", "32768"]
WAIT = 60.0  # generous bound: only a broken capture takes this long


def skip_unless_capture() -> None:
    if shutil.which("tcpdump") is None:
        pytest.skip("no packet capture tool: install tcpdump (apt-get install tcpdump)")
    if os.geteuid() != 0:
        pytest.skip("capturing on lo needs root or CAP_NET_RAW; run as root")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Capture:
    """`tcpdump -w path` of `tcp port PORT` on lo, live between start() and stop()."""

    def __init__(self, path: Path, port: int) -> None:
        skip_unless_capture()
        self.path, self.port = path, port
        self.marker_port = _free_udp_port()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._sent = 0
        self._err: list[str] = []
        self.stderr = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Capture:
        filt = f"tcp port {self.port} or (udp and dst port {self.marker_port})"
        self.proc = subprocess.Popen(
            [*TCPDUMP, "-l", "-q", "--print", "-w", str(self.path), filt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()
        self.mark()
        return self

    def _pump(self, f) -> None:
        for line in f:
            self._lines.put(line)
        self._lines.put(None)

    def _drain_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    def mark(self) -> None:
        """Send a marker datagram and wait until tcpdump has written it. Until it shows,
        the marker is sent again (the first may go out before the kernel filter is set),
        each time with a new length, so only this call's marker is taken for it."""
        assert self.proc is not None
        deadline = time.monotonic() + WAIT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while True:
                self._sent += 1
                s.sendto(b"m" * self._sent, ("127.0.0.1", self.marker_port))
                want = f".{self.marker_port}: UDP, length {self._sent}"
                while True:
                    try:
                        line = self._lines.get(timeout=0.5)
                    except queue.Empty:
                        line = ""
                    if line is None or self.proc.poll() is not None:
                        pytest.skip(f"tcpdump failed: {''.join(self._err)[:300]}")
                    if want in line:
                        return
                    if not line:
                        break  # nothing printed for a while: send the marker again
                assert time.monotonic() < deadline, f"tcpdump never wrote a marker: {self._err}"

    def stop(self) -> None:
        """Wait until everything sent so far is written, then stop tcpdump."""
        assert self.proc is not None
        try:
            if self.proc.poll() is None:
                self.mark()
        finally:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = "".join(self._err)
        assert re.search(r"^0 packets dropped by kernel", self.stderr, re.M), self.stderr


# What docs/troubleshooting.md captures: the demo with these options, on a fixed port.
DEMO_ARGS = ["--disk-size", "2T", "--dirty", "0.002", "--write-rate", "300000",
             "--downtime-ms", "1", "--max-passes", "3"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def capture_demo(tmp: Path) -> dict:
    """`bitmig demo` (troubleshooting.md's options) with its destination on a known port,
    captured the way the document says: tcpdump on lo, whole packets, a large buffer."""
    port = free_tcp_port()
    cap, trace = tmp / "demo.pcap", tmp / "demo.trace"
    capture = Capture(cap, port).start()
    try:
        r = subprocess.run([sys.executable, "-m", "bitmig", "demo", *DEMO_ARGS, "--port",
                            str(port), "--json", "--trace", str(trace)],
                           capture_output=True, text=True, timeout=300)
    finally:
        capture.stop()  # the demo has exited: every packet it sent is in the file
    assert r.returncode == 0, r.stderr
    return {"port": port, "capture": cap, "source_trace": trace,
            "dest_trace": Path(str(trace) + ".dest"), "summary": json.loads(r.stdout)}
