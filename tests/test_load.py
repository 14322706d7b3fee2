"""Load: 32 bitmaps from 4 sources into one destination at once."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import numpy as np

from bitmig.core.store import Store
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.registry import Ownership
from bitmig.daemon.service import Daemon
from bitmig.tools.workload import Workload


async def test_32_bitmaps_from_4_sources(tmp_path: Path) -> None:
    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    opts = MigrationOptions(small_threshold=0, frame_payload=256 << 10, io_timeout=20,
                            max_passes=8)
    sources, workloads = [], []
    for s in range(4):
        src = Daemon("source", options=opts)
        entries = []
        for b in range(8):
            e = src.registry.add(f"src{s}", f"b{b}", 1 << 40, 65536, 1024)  # 2 MiB each
            e.bitmap.fill_random(0.05 * (b % 4), np.random.default_rng(s * 8 + b))
            entries.append(e)
        wl = Workload(entries, rate=5_000, reset_fraction=0.1, seed=s)
        sources.append(src)
        workloads.append(wl)
    for wl in workloads:
        wl.start()
    t0 = time.monotonic()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(src.migrate("127.0.0.1", port) for src in sources)), 600)
    finally:
        for wl in workloads:
            await wl.stop()
    dt = time.monotonic() - t0
    for src, res in zip(sources, results, strict=True):
        assert res.ok, res.error
        assert len(res.bitmaps) == 8
        for out in res.bitmaps:
            e = src.registry.get(out.node, out.name)
            assert e.state is Ownership.HANDED_OFF
            got = dest.registry.get(out.node, out.name).bitmap
            assert got.sha256().hex() == out.sha256
            assert np.array_equal(got.words, e.bitmap.words)
    await asyncio.wait_for(dest.connections_closed(), 60)  # each source's end answered
    assert dest.budget_used == 0 and not dest.reserved
    good, bad = Store(tmp_path / "d").load_all()
    assert len(good) == 32 and not bad
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(r.bytes_sent for r in results)
    passes = [r.passes for r in results]
    print(f"\nload: 32 bitmaps (64 MiB) from 4 sources in {dt:.2f}s, passes {passes}, "
          f"{total / 2**20:.1f} MiB sent, peak RSS {rss:.0f} MiB")
    await dest.close()
