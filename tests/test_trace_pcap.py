"""`bitmig trace pcap`: a real loopback capture decodes to the daemons' own trace records.

Needs tcpdump and the right to capture on `lo` (root or CAP_NET_RAW);
skips with the reason otherwise. test_wireshark.py reuses `capture_migration`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from capture import Capture, skip_unless_capture

from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.service import Daemon
from bitmig.tools.pcap_decode import _Direction, decode_capture
from bitmig.tools.trace_cli import read_trace, summarize
from bitmig.tools.workload import Workload

pytest.importorskip("dpkt")

COMPARED = ("dir", "kind", "bytes", "fields", "payload_len", "payload_crc32")


async def capture_migration(tmp: Path, *, disk_size: int = 2 << 40, write_rate: float = 200_000,
                            dirty: float = 0.002) -> dict[str, Any]:
    """Run a live migration of a 4 MiB bitmap between two in-process daemons on loopback
    while tcpdump captures it. Returns port, capture path, both traces and the result."""
    skip_unless_capture()
    src_trace, dst_trace, cap = tmp / "src.jsonl", tmp / "dst.jsonl", tmp / "mig.pcap"
    dest = Daemon("destination", str(tmp / "state"), str(dst_trace))
    _, port = await dest.listen("127.0.0.1", 0)
    capture = Capture(cap, port).start()  # returns once packets are being written
    try:
        opts = MigrationOptions(downtime_ms=1, max_passes=3, small_threshold=64 << 10)
        src = Daemon("source", None, str(src_trace), opts)
        e = src.registry.add("drive0", "b0", disk_size, 64 << 10, 1024)
        rng = np.random.default_rng(7)
        e.bitmap.set_many(rng.integers(0, e.bitmap.nbits // 2, int(e.bitmap.nbits * dirty)))
        load = Workload([e], write_rate, reset_fraction=0.05, seed=7)
        load.start()
        result = await src.migrate("127.0.0.1", port)
        await load.stop()
        # The destination has sent its last frame and closed: nothing more on the wire.
        await asyncio.wait_for(dest.connections_closed(), 60)
        src.trace.close()
    finally:
        capture.stop()  # returns once every packet sent so far is in the file
        await dest.close()
    assert result.ok, result.error
    return {"port": port, "capture": cap, "source_trace": src_trace, "dest_trace": dst_trace,
            "result": result}


def project(records: list[dict[str, Any]], direction: str) -> list[tuple[Any, ...]]:
    return [tuple(json.dumps(r.get(k), sort_keys=True) for k in COMPARED)
            for r in records if r.get("type") == "frame" and r["dir"] == direction]


async def test_capture_matches_daemon_traces(tmp_path: Path) -> None:
    run = await capture_migration(tmp_path)
    for view, trace in (("source", run["source_trace"]), ("destination", run["dest_trace"])):
        decoded = decode_capture(str(run["capture"]), run["port"], view)
        assert [r for r in decoded if r["type"] != "frame"] == []
        own = [r for r in read_trace(str(trace)) if r["type"] == "frame"]
        assert len(decoded) == len(own)
        for d in ("send", "recv"):  # frame for frame, in order, per direction
            assert project(decoded, d) == project(own, d), (view, d)
        assert {r["peer"] for r in decoded} == {r["peer"] for r in own}
        assert {r["side"] for r in decoded} == {view}
    # the capture's summary agrees with the source's on what the source sent
    cap = summarize(decode_capture(str(run["capture"]), run["port"]))
    own_s = summarize(read_trace(str(run["source_trace"])))
    for k in ("bytes_sent", "frames_sent", "chunks_sent", "zero_runs"):
        assert cap[k] == own_s[k], k
    assert cap["bytes_sent"] == run["result"].bytes_sent
    assert run["result"].passes >= 1  # the capture covers dirty passes, not only bulk


async def test_cli_pcap_summary_and_show(tmp_path: Path) -> None:
    run = await capture_migration(tmp_path, write_rate=0)
    base = [sys.executable, "-m", "bitmig", "trace", "pcap", str(run["capture"]),
            "--port", str(run["port"])]
    out = subprocess.run([*base, "--summary", "--summary-json"], capture_output=True,
                         text=True, check=True).stdout
    s = json.loads(out)
    assert s["bytes_sent"] == run["result"].bytes_sent
    show = subprocess.run([*base, "--show"], capture_output=True, text=True, check=True).stdout
    assert " hello " in show and " complete " in show and " ack " in show
    jl = subprocess.run(base, capture_output=True, text=True, check=True).stdout.splitlines()
    assert json.loads(jl[0])["kind"] == "hello"


def test_demo_capture_decodes_completely(demo_capture: dict[str, Any]) -> None:
    """The documented demo, captured as troubleshooting.md says (on a busy machine its
    segments arrive out of order): every frame each daemon traced is decoded, in order."""
    cap, port = str(demo_capture["capture"]), demo_capture["port"]
    for view, trace in (("source", demo_capture["source_trace"]),
                        ("destination", demo_capture["dest_trace"])):
        decoded = decode_capture(cap, port, view)
        assert [r for r in decoded if r["type"] != "frame"] == []
        own = [r for r in read_trace(str(trace)) if r["type"] == "frame"]
        for d in ("send", "recv"):
            assert project(decoded, d) == project(own, d), (view, d)
    out = subprocess.run([sys.executable, "-m", "bitmig", "trace", "pcap", cap, "--port",
                          str(port), "--summary", "--summary-json"], capture_output=True,
                         text=True, check=True).stdout
    s, own_s = json.loads(out), summarize(read_trace(str(demo_capture["source_trace"])))
    for k in ("bytes_sent", "frames_sent", "chunks_sent", "zero_runs"):
        assert s[k] == own_s[k], k
    assert s["bytes_sent"] == demo_capture["summary"]["bytes_sent"]


def test_reassembly_out_of_order_and_retransmits() -> None:
    d = _Direction()
    assert d.segment(1000, True, b"") == b""
    assert d.segment(1006, False, b"world") == b""  # early: waits
    assert d.segment(1001, False, b"hello") == b"helloworld"
    assert d.segment(1001, False, b"hello") == b""  # retransmission
    assert d.segment(1009, False, b"ldXY") == b"XY"  # overlapping retransmission
    d = _Direction()
    assert d.segment(0xFFFFFFFF, True, b"") == b""  # sequence numbers wrap
    assert d.segment(0, False, b"ab") == b"ab"
    assert d.segment(2, False, b"c") == b"c"
