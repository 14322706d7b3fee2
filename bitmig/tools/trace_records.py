"""Protocol trace records (JSON lines written by bitmig.daemon.trace_writer, or decoded
from a capture by bitmig.tools.pcap_decode): reading them and totalling them. Shared by
`bitmig trace` (trace_cli) and the plot (trace_plot)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from bitmig.protocol.spec import Role


def read_trace(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sent_by_source(r: dict[str, Any]) -> bool:
    """True for a frame record of a frame the source sent, whichever side traced it."""
    if r.get("type") != "frame":
        return False
    side = r.get("side", Role.SOURCE)
    return (r["dir"] == "send") == (side != Role.DESTINATION)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: frames, bytes, chunks, zero runs; plus passes, downtime and outcome.

    Works on a source trace, a destination trace or records decoded from a capture.
    bytes_sent, frames_sent, chunks_sent and zero_runs count only frames the source sent
    (what `bitmig demo` and the migration result report); phases and kinds count every
    frame in both directions. A destination trace has no phase events: its frames are
    split into setup/transfer/completion/done by the frames themselves.
    """
    phases: dict[str, dict[str, Any]] = {}
    phase = "setup"
    out: dict[str, Any] = {"phases": phases, "passes": 0, "forced": False,
                           "downtime_ms": None, "outcome": None, "migrations": 0}
    sent: Counter[str] = Counter()
    has_phases = any(r.get("type") == "phase" for r in records)
    for r in records:
        t = r.get("type")
        if t in ("migration", "connection"):  # a new migration starts in setup
            phase = "setup"
            out["migrations"] += 1
            out["passes"] = 0
        elif t == "phase":
            phase = r["phase"]
            if "downtime_ms" in r:
                out["downtime_ms"] = r["downtime_ms"]
        elif t == "pass":
            out["passes"] = max(out["passes"], r["n"])
        elif t == "forced":
            out["forced"] = True
        elif t == "outcome":
            out["outcome"] = "ok" if r.get("ok") else f"failed: {r.get('error')}"
            if r.get("downtime_ms") and out["downtime_ms"] is None:
                out["downtime_ms"] = r["downtime_ms"]
        elif t == "frame":
            kind = r["kind"]
            if not has_phases:  # infer from the frames (destination traces, captures)
                if kind in ("bits", "zeroes", "spans") and phase == "setup":
                    phase = "transfer"
                elif kind == "complete":
                    phase = "completion"
                elif kind == "end":
                    phase = "done"
                elif kind == "hello":
                    phase = "setup"
            p = phases.setdefault(phase, {"frames": 0, "bytes": 0, "chunks": 0,
                                          "zero_runs": 0, "kinds": Counter()})
            p["frames"] += 1
            p["bytes"] += r["bytes"]
            p["kinds"][kind] += 1
            if sent_by_source(r):
                sent[kind] += 1
                if kind in ("bits", "zeroes"):
                    p["chunks"] += r["fields"]["count"]
                elif kind == "spans":
                    p["chunks"] += r["chunks"]
                if kind == "zeroes":
                    p["zero_runs"] += 1
    for p in phases.values():
        p["kinds"] = dict(p["kinds"])
    out["migrations"] = max(out["migrations"], 1 if phases else 0)
    out["bytes_sent"] = sum(r["bytes"] for r in records if sent_by_source(r))
    out["frames_sent"] = dict(sent)
    out["chunks_sent"] = sum(p["chunks"] for p in phases.values())
    out["zero_runs"] = sum(p["zero_runs"] for p in phases.values())
    return out
