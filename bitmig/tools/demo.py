"""`bitmig demo`: a live migration on loopback between two processes, with a workload."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bitmig.core.units import format_size
from bitmig.daemon.control import acall
from bitmig.daemon.service import Daemon
from bitmig.protocol.spec import Role
from bitmig.session.source import OPTION_NAMES, MigrationOptions, OptionsError, build_options
from bitmig.tools.progress import progress_printer
from bitmig.tools.workload import Workload


def dest_trace_path(path: str) -> str:
    return path + ".dest"


async def start_dest(workdir: Path, trace: str | None = None,
                     extra: list[str] | None = None,
                     port: int = 0) -> tuple[subprocess.Popen[str], str, int, str]:
    """Start `bitmig dest` as its own process on a loopback port (0: a free one); wait
    until ready."""
    sock = str(workdir / "dest.sock")
    cmd = [sys.executable, "-m", "bitmig", "dest", "--listen", f"127.0.0.1:{port}",
           "--state-dir", str(workdir / "dest-state"), "--control", sock,
           "--log-level", "warning", *(extra or [])]
    if trace:
        cmd += ["--trace", trace]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"destination did not start: {line!r}")
    host, port = line.split()[2].rsplit(":", 1)
    return proc, host, int(port), sock


async def demo(a: argparse.Namespace, show: Any,
               opts: MigrationOptions | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bitmig-demo-") as tmp:
        work = Path(tmp)
        proc, host, port, sock = await start_dest(
            work, dest_trace_path(a.trace) if a.trace else None, port=a.port)
        try:
            opts = opts or demo_options(a)
            src = Daemon(Role.SOURCE, None, a.trace, opts)
            rng = np.random.default_rng(a.seed)
            for i in range(a.bitmaps):
                e = src.registry.add("drive0", f"bitmap{i}", a.disk_size, a.granularity,
                                     a.chunk_size, persistent=True)
                e.bitmap.fill_random(a.dirty, rng)
            entries = list(src.registry.entries.values())
            work_load = Workload(entries, a.write_rate, reset_fraction=0.05, seed=a.seed)
            work_load.start()
            result = await src.migrate(host, port, progress=show)
            await work_load.stop()
            dest_digests = {}
            for b in result.bitmaps:
                if b.ok:
                    q = await acall(sock, "query", node=b.node, name=b.name)
                    dest_digests[f"{b.node}/{b.name}"] = q["sha256"]
            src.trace.close()
            await acall(sock, "shutdown")
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    src_digests = {f"{b.node}/{b.name}": b.sha256 for b in result.bitmaps if b.ok}
    verified = result.ok and src_digests == dest_digests and len(src_digests) == a.bitmaps
    first = next(iter(src_digests), None)
    return {
        "verified": verified,
        "source_digest": src_digests.get(first, "") if first else "",
        "dest_digest": dest_digests.get(first, "") if first else "",
        "digests": {k: {"source": v, "dest": dest_digests.get(k)} for k, v in src_digests.items()},
        "downtime_ms": round(result.downtime_ms, 3),
        "frozen_total_ms": round(result.frozen_total_ms, 3),
        "groups": result.groups,
        "bytes_sent": result.bytes_sent,
        "bytes_live": result.bytes_live,
        "bitmap_bytes": result.bitmap_bytes,
        "passes": result.passes,
        "forced": result.forced,
        "skipped_live": [f"{b.node}/{b.name}" for b in result.bitmaps if not b.live],
        "frames": result.frames,
        "zero_runs": result.zero_runs,
        "chunks_sent": result.chunks_sent,
        "duration_s": round(result.duration_s, 3),
        "writes": work_load.writes,
        "resets": work_load.resets,
        "disk_size": a.disk_size,
        "granularity": a.granularity,
        "chunk_size": a.chunk_size,
        "error": result.error,
    }


def demo_options(a: argparse.Namespace) -> MigrationOptions:
    return build_options({k: getattr(a, k) for k in OPTION_NAMES if hasattr(a, k)})


def run_demo(a: argparse.Namespace) -> int:
    try:
        opts = demo_options(a)
    except OptionsError as e:
        print(f"bitmig demo: {e}", file=sys.stderr)
        return 2
    if a.trace and os.path.exists(a.trace):
        os.unlink(a.trace)
    show = None if a.json else progress_printer(sys.stdout)
    if not a.json:
        print(f"bitmig demo: {a.bitmaps} bitmap(s) of a {format_size(a.disk_size)} disk at "
              f"{format_size(a.granularity)}, {a.dirty:.0%} dirty, {a.write_rate:g} writes/s")
    s = asyncio.run(demo(a, show, opts))
    if a.json:
        print(json.dumps(s))
    else:
        ratio = s["bytes_sent"] / s["bitmap_bytes"] if s["bitmap_bytes"] else 0
        print(f"passes: {s['passes']}{' (forced)' if s['forced'] else ''}   zero runs: "
              f"{s['zero_runs']}   frames: {s['frames']}")
        print(f"bytes on the wire: {s['bytes_sent']} ({ratio:.3f} x bitmap of "
              f"{format_size(s['bitmap_bytes'])})")
        groups = (f" (longest of {s['groups']} frozen windows, {s['frozen_total_ms']:.1f} ms "
                  "in all)" if s["groups"] > 1 else "")
        print(f"downtime: {s['downtime_ms']:.1f} ms{groups}   duration: "
              f"{s['duration_s']:.2f} s   writes during migration: {s['writes']} "
              f"(+{s['resets']} resets)")
        print(f"source sha256: {s['source_digest']}")
        print(f"dest   sha256: {s['dest_digest']}")
        print("verified: " + ("yes" if s["verified"] else f"NO ({s['error']})"))
    return 0 if s["verified"] else 1
