"""proto/bitmig.lua: tshark dissects a capture of the documented demo, taken as
docs/troubleshooting.md says, into every frame the daemons' traces say were sent.

Needs tshark (apt-get install tshark) and tcpdump with the right to capture on `lo`;
skips with the reason otherwise. tshark 4.0 runs Lua scripts as root because
Debian's init.lua sets run_user_scripts_when_superuser = true; it only prints a warning.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from bitmig.protocol.spec import Kind
from bitmig.tools.trace_cli import read_trace

LUA = Path(__file__).resolve().parent.parent / "proto" / "bitmig.lua"


def tshark(cap: Path, port: int, *args: str) -> str:
    # The options troubleshooting.md gives: out-of-order segments are reassembled too
    # (loopback captures on a busy multi-CPU machine hold them).
    cmd = ["tshark", "-r", str(cap), "-o", "tcp.reassemble_out_of_order:TRUE",
           "-X", f"lua_script:{LUA}", "-d", f"tcp.port=={port},bitmig", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Lua: Error" not in p.stderr and "lua_script" not in p.stderr, p.stderr
    return p.stdout


def values(out: str) -> list[str]:
    """One tshark -T fields column: a packet may carry several frames, comma separated."""
    return [v for line in out.splitlines() for v in line.split(",") if v]


def test_tshark_lua_dissector_matches_trace(request: pytest.FixtureRequest) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed (DEBIAN_FRONTEND=noninteractive apt-get install "
                    "tshark)")
    run = request.getfixturevalue("demo_capture")
    cap, port = run["capture"], run["port"]
    trace = [r for r in read_trace(str(run["source_trace"])) if r["type"] == "frame"]
    # Every frame sent on the wire, by either daemon's own account.
    sent = [r for t in ("source_trace", "dest_trace") for r in read_trace(str(run[t]))
            if r["type"] == "frame" and r["dir"] == "send"]
    want = Counter(r["kind"] for r in sent)
    assert want == Counter(r["kind"] for r in trace)  # the two traces agree

    kinds = values(tshark(cap, port, "-T", "fields", "-e", "bitmig.kind"))
    got = Counter(Kind(int(k)).name.lower() for k in kinds)
    assert got == want
    assert values(tshark(cap, port, "-T", "fields", "-e", "bitmig.kind_name")) == \
        [Kind(int(k)).name.lower() for k in kinds]

    # header fields and payload lengths, in the order of the trace's frames
    bits = [r for r in trace if r["kind"] in ("bits", "spans")]
    assert [int(v) for v in values(tshark(cap, port, "-T", "fields", "-e",
                                          "bitmig.payload_len"))] == \
        [r["payload_len"] for r in bits]
    # spans frames: the runs decoded from the run list cover the chunks the trace counts
    spans = [r for r in trace if r["kind"] == "spans"]
    assert spans, "the demo's dirty pass and completion travel in spans frames"
    for field, key in (("bitmig.run_count", "runs"), ("bitmig.run_chunks", "chunks")):
        got = values(tshark(cap, port, "-T", "fields", "-e", field))
        assert [int(v) for v in got] == [r[key] for r in spans], field
    firsts = values(tshark(cap, port, "-Y", "bitmig.kind == 5", "-T", "fields",
                           "-e", "bitmig.first"))
    assert [int(v) for v in firsts] == \
        [r["fields"]["first"] for r in trace if r["kind"] == "zeroes"]
    out = tshark(cap, port, "-Y", "bitmig.kind == 2", "-T", "fields", "-e", "bitmig.node",
                 "-e", "bitmig.name", "-e", "bitmig.disk_size", "-e", "bitmig.live")
    start = next(r["fields"] for r in trace if r["kind"] == "start")
    node, name, disk, live = out.split()
    assert (node, name, int(disk)) == (start["node"], start["name"], start["disk_size"])
    assert live.lower() in ("1", "true") and start["live"]
    assert tshark(cap, port, "-Y", "bitmig.malformed").strip() == ""
