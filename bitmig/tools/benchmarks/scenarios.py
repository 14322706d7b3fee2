"""The six scenarios of `bitmig bench`. Each returns a dict of figures plus "target"
(the goal in words) and "met" (bool)."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import zlib
from itertools import pairwise
from typing import Any

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.planner import Planner
from bitmig.daemon.migration import MigrationOptions, MigrationResult
from bitmig.daemon.service import Daemon
from bitmig.protocol import codec, encodings
from bitmig.protocol.geometry import serialized_size
from bitmig.protocol.spec import Role
from bitmig.tools.benchmarks.common import (
    GB,
    GRAN,
    GiB,
    MiB,
    bitmap_of,
    destination,
    proc_status,
    random_words,
    raw_tcp,
)
from bitmig.tools.benchmarks.proxy import RateLimitProxy
from bitmig.tools.workload import Workload

NEVER_LIVE = 1 << 62  # small_threshold that sends every bitmap whole in the frozen window


async def migrate_once(bm: DirtyBitmap, opts: MigrationOptions | None = None,
                       write_rate: float = 0.0, via: Any = None) -> dict[str, Any]:
    """Migrate `bm` from an in-process source to a fresh destination process, optionally
    under a workload and through a proxy factory `via(host, port) -> (host, port)`."""
    async with destination() as (proc, host, port, _sock):
        proxy = None
        if via is not None:
            proxy = via(host, port)
            host, port = await proxy.start()
        src = Daemon(Role.SOURCE, options=opts or MigrationOptions())
        e = src.registry.add("drive0", "bench", bm.disk_size, bm.granularity, bm.chunk_size,
                             bitmap=bm)
        marks: dict[str, float] = {}

        def progress(p: dict[str, Any]) -> None:
            marks.setdefault(p["phase"], time.monotonic())

        wl = None
        if write_rate:
            wl = Workload([e], write_rate, reset_fraction=0.0, seed=7)
            wl.start()
        t0 = time.monotonic()
        r: MigrationResult = await src.migrate(host, port, progress=progress)
        if wl is not None:
            await wl.stop()
        if proxy is not None:
            await proxy.close()
        dest_hwm = proc_status(proc.pid)["VmHWM"]
    # Phase durations: each phase runs from its own mark to the next one.
    seq = [("setup", t0)] + [(k, marks[k]) for k in ("bulk", "dirty", "completion", "done")
                             if k in marks]
    phases = {f"{a}_s": round(tb - ta, 4) for (a, ta), (_, tb) in pairwise(seq)}
    return {"ok": r.ok, "error": r.error, "duration_s": r.duration_s,
            "downtime_ms": r.downtime_ms, "bytes_sent": r.bytes_sent,
            "bytes_live": r.bytes_live, "bitmap_bytes": r.bitmap_bytes, "passes": r.passes,
            "forced": r.forced, "frames": r.frames, "phases": phases,
            "writes": wl.writes if wl else 0, "dest_hwm": dest_hwm}


# -- 1. throughput ------------------------------------------------------------------


async def throughput(quick: bool) -> dict[str, Any]:
    size = 32 * MiB if quick else GiB
    bm = bitmap_of(size, 0.5)
    raw = await asyncio.to_thread(raw_tcp, bm.words, 3)
    runs = [await migrate_once(bm) for _ in range(2)]
    best = min(runs, key=lambda r: r["duration_s"])
    raw_best = min(raw)
    raw_gbps = size / raw_best / GB
    mig_gbps = size / best["duration_s"] / GB
    bulk = best["phases"].get("bulk_s", 0.0)
    ratio = mig_gbps / raw_gbps
    return {
        "target": "bitmig end-to-end rate >= 0.8 x raw loopback TCP (same bytes, same run)",
        "met": bool(best["ok"] and ratio >= 0.8),
        "bitmap_bytes": size, "pattern": "random p=0.5",
        "raw_tcp_s": [round(x, 4) for x in raw], "raw_tcp_gbps": round(raw_gbps, 3),
        "bitmig_s": [round(r["duration_s"], 4) for r in runs],
        "bitmig_gbps": round(mig_gbps, 3),
        "bitmig_bulk_phase_gbps": round(size / bulk / GB, 3) if bulk else None,
        "ratio": round(ratio, 3), "bytes_sent": best["bytes_sent"],
        "phases": best["phases"], "ok": best["ok"],
    }


# -- 2. downtime --------------------------------------------------------------------


async def downtime(quick: bool) -> dict[str, Any]:
    size = 16 * MiB if quick else 256 * MiB
    rate = 10_000.0
    words0 = bitmap_of(size, 0.10, seed=2).words
    disk = size * 8 * GRAN
    live = await migrate_once(DirtyBitmap(disk, GRAN, 1024, words=words0.copy()),
                              write_rate=rate)
    snc = await migrate_once(DirtyBitmap(disk, GRAN, 1024, words=words0),
                             MigrationOptions(small_threshold=NEVER_LIVE), write_rate=rate)
    ratio = live["downtime_ms"] / snc["downtime_ms"] if snc["downtime_ms"] else 0.0
    bytes_ratio = live["bytes_sent"] / live["bitmap_bytes"]
    return {
        "target": "bitmig downtime <= 0.05 x stop-and-copy; bytes_sent <= 1.3 x bitmap",
        "met": bool(live["ok"] and snc["ok"] and ratio <= 0.05 and bytes_ratio <= 1.3),
        "bitmap_bytes": size, "dirty_at_start": 0.10, "write_rate": rate,
        "achieved_write_rate": round(
            live["writes"] / max(1e-9, live["duration_s"] - live["downtime_ms"] / 1000)),
        "bitmig_downtime_ms": round(live["downtime_ms"], 2),
        "stop_and_copy_downtime_ms": round(snc["downtime_ms"], 2),
        "downtime_ratio": round(ratio, 4),
        "bytes_ratio": round(bytes_ratio, 4), "passes": live["passes"],
        "forced": live["forced"], "bitmig_duration_s": round(live["duration_s"], 3),
        "stop_and_copy_duration_s": round(snc["duration_s"], 3),
        "bitmig_bytes_sent": live["bytes_sent"], "stop_and_copy_bytes_sent": snc["bytes_sent"],
        "ok": live["ok"] and snc["ok"],
    }


# -- 3. wire bytes ------------------------------------------------------------------

WIRE_DISK = 2 << 40  # 2 TiB at 64 KiB: 2**25 bits, 4 MiB raw


def _runs_words(nbits: int, nruns: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slot = 2 * length  # one run per slot, random offset: runs never touch
    starts = np.sort(rng.choice(nbits // slot, nruns, replace=False)) * slot
    starts += rng.integers(0, length, nruns)
    pos = (starts[:, None] + np.arange(length)).ravel()
    return encodings.words_from_positions(pos, nbits // 64)


def wire_patterns() -> list[tuple[str, np.ndarray]]:
    nbits = WIRE_DISK // GRAN
    nbytes = nbits // 8
    out = [(f"random p={p:g}", random_words(nbytes, p, seed=3)) for p in (1e-4, 1e-3, 1e-2, 0.1)]
    out.append(("random p=0.5", random_words(nbytes, 0.5, seed=3)))
    out.append(("1,000 runs x 64 bits", _runs_words(nbits, 1000, 64, 4)))
    out.append(("100 runs x 4,096 bits", _runs_words(nbits, 100, 4096, 5)))
    out.append(("all ones", np.full(nbits // 64, 0xFFFF_FFFF_FFFF_FFFF, dtype="<u8")))
    out.append(("all zeros", np.zeros(nbits // 64, dtype="<u8")))
    return out


def wire_bytes(quick: bool) -> dict[str, Any]:
    import pyroaring

    rows = []
    for name, words in wire_patterns():
        raw = words.nbytes
        bm = DirtyBitmap(WIRE_DISK, GRAN, 1024, words=words)
        frames = Planner(bm, 0).take_all()
        mig = sum(len(codec.encode_bytes(f)) for f in frames)
        rb = pyroaring.BitMap(encodings.set_positions(words).astype(np.uint32))
        rb.run_optimize()
        roar = len(rb.serialize())
        dense = name in ("random p=0.1", "random p=0.5")
        ok = mig <= roar + 64 and (not dense or mig <= 1.01 * raw)
        rows.append({"pattern": name, "raw": raw, "bitmig": mig, "roaring": roar,
                     "zlib1": len(zlib.compress(words.tobytes(), 1)), "frames": len(frames),
                     "bitmig_vs_roaring": mig - roar, "bitmig_vs_raw": round(mig / raw, 4),
                     "met": ok})
    return {"target": "data frames <= roaring (portable, run-optimized) + 64 B for every "
                      "pattern; <= 1.01 x raw for dense random (p=0.1, 0.5)",
            "met": all(r["met"] for r in rows), "disk": "2 TiB at 64 KiB (4 MiB raw)",
            "patterns": rows}


# -- 4. slow link -------------------------------------------------------------------


async def slow_link(quick: bool) -> dict[str, Any]:
    rate = 4e6
    disk = 250 * 10**9 if quick else 10**12
    gran = 16 * 1024
    nbytes = serialized_size(disk, gran)
    bm = bitmap_of(nbytes, 0.10, gran, seed=6, disk_size=disk)
    nominal = nbytes if quick else 8 * MiB
    limit_s = 2 * nominal / rate
    r = await migrate_once(bm, write_rate=200.0,
                           via=lambda h, p: RateLimitProxy(h, p, rate))
    return {
        "target": f"completes in <= 2 x ({nominal} B / 4 MB/s) = {limit_s:.2f} s",
        "met": bool(r["ok"] and r["duration_s"] <= limit_s),
        "disk": disk, "granularity": gran, "bitmap_bytes": nbytes, "link_bytes_per_s": rate,
        "write_rate": 200.0, "dirty_at_start": 0.10, "duration_s": round(r["duration_s"], 3),
        "limit_s": round(limit_s, 3), "ideal_s": round(nbytes / rate, 3),
        "downtime_ms": round(r["downtime_ms"], 1), "passes": r["passes"],
        "forced": r["forced"], "bytes_sent": r["bytes_sent"],
        "bytes_ratio": round(r["bytes_sent"] / nbytes, 4), "ok": r["ok"],
    }


# -- 5/6. memory and scale: both sides in their own processes -----------------------

_pairs: dict[int, dict[str, Any]] = {}


async def migrate_processes(size: int) -> dict[str, Any]:
    """Source and destination each in a child process; memory of both (VmHWM)."""
    if size in _pairs:
        return _pairs[size]
    async with destination() as (proc, host, port, _sock):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bitmig.tools.benchmarks.child", str(size), "0.5", host,
            str(port), stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        dest_hwm = proc_status(proc.pid)["VmHWM"]
    src = json.loads(out.decode().strip().splitlines()[-1])
    limit = 1.5 * size + 64 * MiB
    res = {"bitmap_bytes": size, "ok": src["ok"], "duration_s": round(src["duration_s"], 3),
           "gbps": round(size / src["duration_s"] / GB, 3),
           "source_peak_rss": src["hwm"], "dest_peak_rss": dest_hwm,
           "source_peak_x": round(src["hwm"] / size, 3), "dest_peak_x": round(dest_hwm / size, 3),
           "limit_rss": int(limit),
           "met": bool(src["ok"] and src["hwm"] <= limit and dest_hwm <= limit)}
    _pairs[size] = res
    return res


async def memory(quick: bool) -> dict[str, Any]:
    sizes = [16 * MiB, 32 * MiB] if quick else [256 * MiB, GiB]
    rows = [await migrate_processes(s) for s in sizes]
    return {"target": "peak RSS <= 1.5 x bitmap + 64 MiB per daemon (source and destination "
                      "each in its own process, dense random bitmap)",
            "met": all(r["met"] for r in rows), "sizes": rows}


async def scale(quick: bool, sizes: list[int] | None = None) -> dict[str, Any]:
    sizes = sizes or ([4 * MiB, 32 * MiB] if quick else
                      [4 * MiB, 32 * MiB, 256 * MiB, GiB, 2 * GiB])
    rows = [await migrate_processes(s) for s in sizes]
    large = [r["gbps"] for r in rows if r["bitmap_bytes"] >= 32 * MiB] or [r["gbps"] for r in rows]
    # The issue sets no rate target for scale: every size must migrate (2 GiB included) and
    # stay in the memory bound. How linear the rate is, is reported, not judged.
    return {"target": "every size migrates and verifies on this 2-core, 24 GiB machine, "
                      "peak RSS <= 1.5 x bitmap + 64 MiB per daemon; rate per size reported",
            "met": bool(all(r["ok"] and r["met"] for r in rows)),
            "rate_spread": round(max(large) / min(large), 2) if min(large) else None,
            "median_gbps": round(statistics.median(r["gbps"] for r in rows), 3),
            "sizes": rows}


SCENARIOS = ("throughput", "downtime", "wire_bytes", "slow_link", "memory", "scale")
