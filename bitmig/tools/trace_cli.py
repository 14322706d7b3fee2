"""`bitmig trace`: the show, summary, pcap and plot commands (argument parsing and output;
the record logic is in trace_records)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bitmig.protocol.spec import Role
from bitmig.tools.trace_records import read_trace, summarize


def cmd_summary(a: argparse.Namespace, records: list[dict[str, Any]] | None = None) -> int:
    s = summarize(read_trace(a.path) if records is None else records)
    if a.json:
        print(json.dumps(s))
        return 0
    for name, p in s["phases"].items():
        print(f"{name:<11} frames {p['frames']:>8}  bytes {p['bytes']:>12}  chunks "
              f"{p['chunks']:>9}  zero runs {p['zero_runs']:>6}  {p['kinds']}")
    print(f"passes {s['passes']}{' (forced)' if s['forced'] else ''}  downtime "
          f"{s['downtime_ms']} ms  bytes sent {s['bytes_sent']}  outcome {s['outcome']}")
    print(f"source sent {s['frames_sent']}  chunks {s['chunks_sent']}  zero runs "
          f"{s['zero_runs']}")
    return 0


def cmd_pcap(a: argparse.Namespace) -> int:
    try:
        from bitmig.tools.pcap_decode import decode_capture
    except ImportError:  # pragma: no cover - dpkt missing
        print("bitmig trace pcap: needs dpkt (pip install 'bitmig[pcap]')", file=sys.stderr)
        return 2
    try:
        recs = decode_capture(a.capture, a.port, a.view)
    except (OSError, ValueError) as e:
        print(f"bitmig trace pcap: {a.capture}: {e}", file=sys.stderr)
        return 1
    if a.output:
        with open(a.output, "w") as f:
            for r in recs:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
    if a.mode == "summary":
        return cmd_summary(a, recs)
    if a.mode == "show":
        return cmd_show(a, recs)
    if not a.output:
        for r in recs:
            print(json.dumps(r, separators=(",", ":")))
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    try:
        from bitmig.tools.trace_plot import plot_trace
    except ImportError:  # pragma: no cover - matplotlib missing
        print("bitmig trace plot: needs matplotlib (pip install 'bitmig[plot]')",
              file=sys.stderr)
        return 2
    plot_trace(read_trace(a.path), a.output, title=a.title or a.path)
    print(f"wrote {a.output}")
    return 0


def cmd_show(a: argparse.Namespace, records: list[dict[str, Any]] | None = None) -> int:
    recs = read_trace(a.path) if records is None else records
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
            shown = dict(r["fields"])
            if "chunks" in r:  # a spans frame: its run list in numbers, not hex
                shown["runs"] = f"{r['runs']} chunks={r['chunks']}"
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            arrow = "->" if r["dir"] == "send" else "<-"
            print(f"{t:10.6f} {r['side'][:4]} {arrow} {r['peer']:<21} {r['kind']:<8} "
                  f"{r['bytes']:>8}B {fields}{extra}")
        elif not a.kind:
            rest = {k: v for k, v in r.items() if k not in ("mono", "wall", "side", "type")}
            print(f"{t:10.6f} {r['side'][:4]} ** {r['type']} {json.dumps(rest)}")
    return 0


def _quiet_pipe(func: Any) -> Any:
    """Run a subcommand; a reader that stops early (`| head`) is not an error."""

    def run(a: argparse.Namespace) -> int:
        try:
            return func(a)
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit
            return 0

    return run


def add_trace_parser(sub: Any, formatter: Any) -> None:
    t = sub.add_parser("trace", formatter_class=formatter, help="inspect protocol traces")
    tsub = t.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    s = tsub.add_parser("show", formatter_class=formatter, help="readable timeline")
    s.add_argument("path")
    s.add_argument("--kind", action="append", help="only frames of this kind (repeatable)")
    s.add_argument("--bitmap", type=int, help="only frames for this bitmap id")
    s.add_argument("--since", type=float, help="seconds from the first record")
    s.add_argument("--until", type=float, help="seconds from the first record")
    s.set_defaults(func=_quiet_pipe(cmd_show))
    m = tsub.add_parser("summary", formatter_class=formatter, help="per phase totals")
    m.add_argument("path")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_quiet_pipe(cmd_summary))
    c = tsub.add_parser("pcap", formatter_class=formatter,
                        help="decode bitmig frames from a pcap/pcapng capture",
                        description="Reassemble every TCP connection on --port and decode its "
                        "frames into trace records\n(JSON lines by default; --show or "
                        "--summary read them like a trace).\nExample: tcpdump -i any -w "
                        "mig.pcap tcp port 7800; bitmig trace pcap mig.pcap --summary")
    c.add_argument("capture")
    c.add_argument("--port", type=int, default=7800, help="the destination's TCP port")
    c.add_argument("--view", choices=list(Role), default=Role.SOURCE,
                   help="whose trace the records imitate (direction and peer)")
    c.add_argument("-o", "--output", metavar="PATH", help="write the records to PATH (JSONL)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--json", dest="mode", action="store_const", const="json",
                   help="print records as JSON lines (default)")
    g.add_argument("--show", dest="mode", action="store_const", const="show",
                   help="print a timeline like `bitmig trace show`")
    g.add_argument("--summary", dest="mode", action="store_const", const="summary",
                   help="print totals like `bitmig trace summary`")
    c.add_argument("--summary-json", dest="json", action="store_true",
                   help="with --summary: print the summary as JSON")
    c.add_argument("--kind", action="append", help="with --show: only this kind (repeatable)")
    c.set_defaults(func=_quiet_pipe(cmd_pcap), mode="json", bitmap=None, since=None,
                   until=None)
    pl = tsub.add_parser("plot", formatter_class=formatter,
                         help="plot pending dirty bytes, bytes sent, passes (PNG)")
    pl.add_argument("path")
    pl.add_argument("-o", "--output", required=True, metavar="FILE.png")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=_quiet_pipe(cmd_plot))


if __name__ == "__main__":
    sys.exit(0)
