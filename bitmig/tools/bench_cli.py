"""`bitmig bench`: benchmarks against raw loopback TCP and peers.

Scenarios (helpers in bitmig/tools/benchmarks/): throughput (vs raw TCP), downtime (vs
stop-and-copy, under a workload), thousand_bitmaps (1,000 small bitmaps vs one large
one), each also `_disk` (destination state on the machine's disk, not tmpfs),
wire_bytes (vs Roaring and zlib), slow_link (through a 4 MB/s proxy), memory (peak RSS
of both daemons) and scale (time, rate, memory per size). Every scenario reports its
target in words and `met`. `--json` prints one object:
{"machine": {...}, "scenarios": {name: {..., "target": str, "met": bool}}}.
Needs only bitmig's own dependencies; the Roaring column of wire_bytes needs the
`bench` extra (pyroaring) and says so when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from bitmig.core.units import format_size, parse_size


def _sizes(text: str) -> list[int]:
    try:
        return [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_bench_parser(sub: Any, formatter: Any) -> None:
    from bitmig.tools.benchmarks.scenarios import SCENARIOS

    b = sub.add_parser(
        "bench", formatter_class=formatter, help="run the benchmarks",
        description="Measure bitmig on loopback against raw TCP, stop-and-copy and roaring.\n"
        "Full run: about 4 minutes on a quiet 2-core machine (far longer on a busy one); "
        "--quick: under 2 minutes at load 3.5, 6-7 minutes at load 12-15.")
    b.add_argument("--json", action="store_true", help="print all figures as one JSON object")
    b.add_argument("--quick", action="store_true", help="small sizes (CI, smoke test)")
    b.add_argument("--scenario", action="append", choices=SCENARIOS, default=None,
                   metavar="NAME", help=f"run only this scenario (repeatable): "
                   f"{', '.join(SCENARIOS)}")
    b.add_argument("--warm-memory", type=_sizes, default=None, metavar="SIZE",
                   help="before measuring, touch this much memory once in a child process "
                   "(default: 8G full run, 0 with --quick). On a VM whose host backs guest "
                   "memory lazily (this machine), the first touch of a page costs a host "
                   "fault: 1.5 s per GiB against 0.3 s once the pages were ever used. A "
                   "long-running daemon's host has its memory in use; the figures should "
                   "not measure the VM's first boot")
    b.add_argument("--disk-dir", default="/var/tmp", metavar="DIR",
                   help="where the *_disk scenarios store the destination's state: a "
                   "directory on the disk to measure (default /var/tmp)")
    b.add_argument("--max-passes", type=int, default=0, metavar="N",
                   help="cap the dirty passes of the runs under a workload (downtime, "
                   "thousand_bitmaps) at N (default: the daemon's, 30). On an overloaded "
                   "machine the dirty loop cannot converge at 10,000 writes/s and each run "
                   "takes its 30 passes; `forced` in the output says when the cap ended it")
    b.add_argument("--sizes", type=_sizes, default=None, metavar="S1,S2,...",
                   help="bitmap sizes of the scale scenario, e.g. 4M,32M,256M,1G,2G")
    b.set_defaults(func=cmd_bench)


_WARM = ("import mmap, sys\n"
         "n = int(sys.argv[1]); m = mmap.mmap(-1, n)\n"
         "m.madvise(23)  # MADV_POPULATE_WRITE: every page touched, in one call\n")


async def run_bench(names: list[str], quick: bool, sizes: list[int] | None,
                    log: Any = None, warm: int = 0) -> dict[str, Any]:
    from bitmig.tools.benchmarks import scenarios as sc
    from bitmig.tools.benchmarks.common import machine

    out: dict[str, Any] = {"machine": machine(), "quick": quick, "scenarios": {}}
    if warm:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", _WARM, str(warm)], check=True)
        out["machine"]["warmed_bytes"] = warm
        out["machine"]["warm_s"] = round(time.monotonic() - t0, 2)
    for name in names:
        if log:
            log(f"bitmig bench: {name}...")
        t0 = time.monotonic()
        try:
            if name == "wire_bytes":
                res = await asyncio.to_thread(sc.wire_bytes, quick)
            elif name == "scale":
                res = await sc.scale(quick, sizes)
            else:
                res = await getattr(sc, name)(quick)
        except (OSError, RuntimeError, ValueError) as e:  # a row that says why, no traceback
            res = {"target": "(not measured)", "met": False, "ok": False,
                   "error": f"{type(e).__name__}: {e}"}
        res["bench_s"] = round(time.monotonic() - t0, 2)
        out["scenarios"][name] = res
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _fmt(k: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int) and (k.endswith("bytes") or k.endswith("rss") or k in (
            "raw", "bitmig", "roaring", "zlib1", "bytes_sent", "disk")) and v >= 1 << 20:
        return f"{v:,} ({format_size(v)})"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{a}={_fmt(a, b)}" for a, b in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(k, x) for x in v)
    return str(v)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(rows[0])
    cells = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width, strict=True))  # noqa: E731
    return [line(cols), line(["-" * w for w in width]), *(line(r) for r in cells)]


def render(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {format_size(m['ram_bytes'])} RAM, "
             f"Linux {m['kernel']}, Python {m['python']}, numpy {m['numpy']}, "
             f"msgpack {m['msgpack']}, destination state on {m['state_dir_fs']} "
             f"(*_disk: {m.get('disk_fs', '?')} at {m.get('disk_dir', '?')}), load average "
             f"{m['loadavg_at_start'][0]} at start, {m.get('loadavg_at_end', ['?'])[0]} at end"
             + ("  [--quick]" if out.get("quick") else "")]
    for name, res in out["scenarios"].items():
        lines += ["", f"== {name}: {'met' if res['met'] else 'MISSED'}  (target: "
                  f"{res['target']})"]
        for k, v in res.items():
            if k in ("target", "met"):
                continue
            if isinstance(v, list) and v and isinstance(v[0], dict):
                lines += ["  " + x for x in _table(v)]
            else:
                lines.append(f"  {k:<28} {_fmt(k, v)}")
    return "\n".join(lines)


def cmd_bench(a: argparse.Namespace) -> int:
    from bitmig.tools.benchmarks.common import DISK_DIR
    from bitmig.tools.benchmarks.scenarios import LIVE, SCENARIOS

    names = a.scenario or list(SCENARIOS)
    DISK_DIR["path"] = a.disk_dir
    LIVE["max_passes"] = a.max_passes
    log = None if a.json else (lambda s: print(s, file=sys.stderr, flush=True))
    warm = a.warm_memory[0] if a.warm_memory else (0 if a.quick else 8 << 30)
    out = asyncio.run(run_bench(names, a.quick, a.sizes, log, warm))
    if a.json:
        print(json.dumps(out))
    else:
        print(render(out))
    return 0 if all(r.get("ok", True) for r in out["scenarios"].values()) else 1
