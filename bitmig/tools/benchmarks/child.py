"""A source daemon in its own process, for the memory, scale and many-bitmaps benchmarks.

    python -m bitmig.tools.benchmarks.child SIZE P HOST PORT [--count N] [--per-node K]
        [--write-rate R] [--max-passes M]

Builds N bitmaps of SIZE serialized bytes each (each bit set with probability P; K
bitmaps per node), migrates them to HOST:PORT under R random writes/s spread over them,
and prints one JSON line: the migration result, the sha256 of every handed-off bitmap
and this process's memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np

from bitmig.tools.benchmarks.common import GRAN, bitmap_of, proc_status


async def main(a: argparse.Namespace) -> dict[str, object]:
    from bitmig.daemon.service import Daemon
    from bitmig.tools.workload import Workload

    base = proc_status()
    from bitmig.daemon.migration import MigrationOptions
    from bitmig.protocol.spec import Role

    src = Daemon(Role.SOURCE, options=MigrationOptions(
        **({"max_passes": a.max_passes} if a.max_passes else {})))
    if a.count == 1:
        bm = bitmap_of(a.size, a.p)
        entries = [src.registry.add("drive0", "bench", bm.disk_size, bm.granularity,
                                    bm.chunk_size, bitmap=bm)]
    else:
        rng = np.random.default_rng(1)
        entries = []
        for i in range(a.count):
            e = src.registry.add(f"drive{i // a.per_node}", f"b{i % a.per_node}",
                                 a.size * 8 * GRAN, GRAN, 1024)
            e.bitmap.fill_random(a.p, rng)
            entries.append(e)
    after_fill = proc_status()
    wl = None
    if a.write_rate:
        wl = Workload(entries, a.write_rate, reset_fraction=0.0, seed=7)
        wl.start()
    result = await src.migrate(a.host, a.port)
    if wl is not None:
        await wl.stop()
    end = proc_status()
    return {"ok": result.ok, "error": result.error, "duration_s": result.duration_s,
            "bytes_sent": result.bytes_sent, "bitmap_bytes": result.bitmap_bytes,
            "downtime_ms": result.downtime_ms, "frozen_total_ms": result.frozen_total_ms,
            "groups": result.groups, "passes": result.passes,
            "forced": result.forced, "frames": result.frames,
            "bitmaps_ok": sum(b.ok for b in result.bitmaps),
            "skipped_live": sum(not b.live for b in result.bitmaps),
            "writes": wl.writes if wl else 0,
            "sha256": {f"{b.node}/{b.name}": b.sha256 for b in result.bitmaps if b.ok},
            "rss_base": base["VmRSS"], "rss_after_fill": after_fill["VmRSS"],
            "hwm": end["VmHWM"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("size", type=int)
    ap.add_argument("p", type=float)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--per-node", type=int, default=4)
    ap.add_argument("--write-rate", type=float, default=0.0)
    ap.add_argument("--max-passes", type=int, default=0)
    out = asyncio.run(main(ap.parse_args()))
    print(json.dumps(out), flush=True)
