"""A source daemon in its own process, for the memory and scale benchmarks.

    python -m bitmig.tools.benchmarks.child SIZE P HOST PORT

Builds a SIZE-byte bitmap (each bit set with probability P), migrates it to HOST:PORT
and prints one JSON line: the migration result and this process's memory (VmHWM).
"""

from __future__ import annotations

import asyncio
import json
import sys

from bitmig.tools.benchmarks.common import bitmap_of, proc_status


async def main(size: int, p: float, host: str, port: int) -> dict[str, object]:
    from bitmig.daemon.service import Daemon
    from bitmig.protocol.spec import Role

    base = proc_status()
    bm = bitmap_of(size, p)
    after_fill = proc_status()
    src = Daemon(Role.SOURCE)
    src.registry.add("drive0", "bench", bm.disk_size, bm.granularity, bm.chunk_size, bitmap=bm)
    result = await src.migrate(host, port)
    end = proc_status()
    return {"ok": result.ok, "error": result.error, "duration_s": result.duration_s,
            "bytes_sent": result.bytes_sent, "bitmap_bytes": result.bitmap_bytes,
            "downtime_ms": result.downtime_ms, "rss_base": base["VmRSS"],
            "rss_after_fill": after_fill["VmRSS"], "hwm": end["VmHWM"]}


if __name__ == "__main__":
    out = asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    print(json.dumps(out), flush=True)
