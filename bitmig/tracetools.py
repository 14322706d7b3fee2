"""`bitmig trace`: read protocol traces (show, summary)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any


def read_trace(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: frames, bytes, chunks, zero runs; plus passes, downtime and outcome."""
    phases: dict[str, dict[str, Any]] = {}
    phase = "setup"
    out: dict[str, Any] = {"phases": phases, "passes": 0, "downtime_ms": None, "outcome": None}
    for r in records:
        t = r.get("type")
        if t == "phase":
            phase = r["phase"]
            if "downtime_ms" in r:
                out["downtime_ms"] = r["downtime_ms"]
        elif t == "pass":
            out["passes"] = max(out["passes"], r["n"])
        elif t == "outcome":
            out["outcome"] = "ok" if r.get("ok") else f"failed: {r.get('error')}"
        elif t == "frame":
            p = phases.setdefault(phase, {"frames": 0, "bytes": 0, "chunks": 0,
                                          "zero_runs": 0, "kinds": Counter()})
            p["frames"] += 1
            p["bytes"] += r["bytes"]
            p["kinds"][r["kind"]] += 1
            if r["kind"] in ("bits", "zeroes") and r["dir"] == "send":
                p["chunks"] += r["fields"]["count"]
            if r["kind"] == "zeroes":
                p["zero_runs"] += 1
    for p in phases.values():
        p["kinds"] = dict(p["kinds"])
    out["bytes_sent"] = sum(r["bytes"] for r in records
                            if r.get("type") == "frame" and r["dir"] == "send")
    return out


def cmd_summary(a: argparse.Namespace) -> int:
    s = summarize(read_trace(a.path))
    if a.json:
        print(json.dumps(s))
        return 0
    for name, p in s["phases"].items():
        print(f"{name:<11} frames {p['frames']:>8}  bytes {p['bytes']:>12}  chunks "
              f"{p['chunks']:>9}  zero runs {p['zero_runs']:>6}  {p['kinds']}")
    print(f"passes {s['passes']}  downtime {s['downtime_ms']} ms  bytes sent {s['bytes_sent']}"
          f"  outcome {s['outcome']}")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    recs = read_trace(a.path)
    t0 = recs[0]["mono"] if recs else 0
    for r in recs:
        t = r["mono"] - t0
        if (a.since is not None and t < a.since) or (a.until is not None and t > a.until):
            continue
        if r.get("type") == "frame":
            if a.kind and r["kind"] not in a.kind:
                continue
            if a.bitmap is not None and r["fields"].get("id") != a.bitmap:
                continue
            extra = f" payload {r['payload_len']}B crc {r['payload_crc32']:08x}" \
                if "payload_len" in r else ""
            fields = " ".join(f"{k}={v}" for k, v in r["fields"].items())
            arrow = "->" if r["dir"] == "send" else "<-"
            print(f"{t:10.6f} {r['side'][:4]} {arrow} {r['peer']:<21} {r['kind']:<8} "
                  f"{r['bytes']:>8}B {fields}{extra}")
        elif not a.kind:
            rest = {k: v for k, v in r.items() if k not in ("mono", "wall", "side", "type")}
            print(f"{t:10.6f} {r['side'][:4]} ** {r['type']} {json.dumps(rest)}")
    return 0


def add_trace_parser(sub: Any, formatter: Any) -> None:
    t = sub.add_parser("trace", formatter_class=formatter, help="inspect protocol traces")
    tsub = t.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    s = tsub.add_parser("show", formatter_class=formatter, help="readable timeline")
    s.add_argument("path")
    s.add_argument("--kind", action="append", help="only frames of this kind (repeatable)")
    s.add_argument("--bitmap", type=int, help="only frames for this bitmap id")
    s.add_argument("--since", type=float, help="seconds from the first record")
    s.add_argument("--until", type=float, help="seconds from the first record")
    s.set_defaults(func=cmd_show)
    m = tsub.add_parser("summary", formatter_class=formatter, help="per phase totals")
    m.add_argument("path")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_summary)


if __name__ == "__main__":
    sys.exit(0)
