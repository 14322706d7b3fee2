"""The scenarios of `bitmig bench`. Each returns a dict of figures plus "target" (the
goal in words) and "met" (bool). Scenarios ending in `_disk` store the destination's
state on the machine's disk (`--disk-dir`), the others on tmpfs."""

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
from bitmig.protocol.spec import Role
from bitmig.tools.benchmarks.common import (
    GB,
    GRAN,
    GiB,
    MiB,
    bitmap_of,
    dest_digests,
    destination,
    disk_write_s,
    freeze_breakdown,
    proc_status,
    random_words,
    raw_tcp,
)
from bitmig.tools.benchmarks.proxy import RateLimitProxy
from bitmig.tools.workload import Workload

NEVER_LIVE = 1 << 62  # small_threshold that sends every bitmap whole in the frozen window
# --quick caps the dirty passes so that a smoke test on an overloaded machine (where the
# dirty loop cannot converge at 10,000 writes/s) ends in seconds; `forced` tells.
QUICK_PASSES = 4
LIVE = {"max_passes": 0}  # `bitmig bench --max-passes`: 0 keeps the daemon's default (30)


def _passes(quick: bool) -> int | None:
    return QUICK_PASSES if quick else (LIVE["max_passes"] or None)
INSTALL_BENCH = "pip install 'bitmig[bench]'"


async def migrate_once(bm: DirtyBitmap, opts: MigrationOptions | None = None,
                       write_rate: float = 0.0, via: Any = None, where: str = "tmpfs",
                       trace: bool = False) -> dict[str, Any]:
    """Migrate `bm` from an in-process source to a fresh destination process storing on
    `where`, optionally under a workload and through a proxy factory
    `via(host, port) -> (host, port)`. After the migration, the destination's sha256 of
    the bitmap is compared with the source's (`digests_equal`)."""
    async with destination(where=where, trace=trace) as dest:
        host, port = dest.host, dest.port
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
        dest_hwm = proc_status(dest.proc.pid)["VmHWM"]
        theirs = await dest_digests(dest.sock, [("drive0", "bench")])
    # Phase durations: each phase runs from its own mark to the next one.
    seq = [("setup", t0)] + [(k, marks[k]) for k in ("bulk", "dirty", "completion", "done")
                             if k in marks]
    phases = {f"{a}_s": round(tb - ta, 4) for (a, ta), (_, tb) in pairwise(seq)}
    ours = {f"{b.node}/{b.name}": b.sha256 for b in r.bitmaps if b.ok}
    return {"ok": r.ok, "error": r.error, "duration_s": r.duration_s,
            "downtime_ms": r.downtime_ms, "bytes_sent": r.bytes_sent,
            "bytes_live": r.bytes_live, "bitmap_bytes": r.bitmap_bytes, "passes": r.passes,
            "forced": r.forced, "frames": r.frames, "phases": phases,
            "writes": wl.writes if wl else 0, "dest_hwm": dest_hwm,
            "digests_equal": bool(ours) and ours == theirs,
            "freeze": freeze_breakdown(dest.events) if trace else {}}


# -- 1. throughput ------------------------------------------------------------------


async def throughput(quick: bool, where: str = "tmpfs") -> dict[str, Any]:
    size = 32 * MiB if quick else GiB
    bm = bitmap_of(size, 0.5)
    raw = await asyncio.to_thread(raw_tcp, bm.words, 3)
    runs = [await migrate_once(bm, where=where) for _ in range(2)]
    best = min(runs, key=lambda r: r["duration_s"])
    raw_best = min(raw)
    raw_gbps = size / raw_best / GB
    mig_gbps = size / best["duration_s"] / GB
    bulk = best["phases"].get("bulk_s", 0.0)
    ratio = mig_gbps / raw_gbps
    ok = all(r["ok"] and r["digests_equal"] for r in runs)
    out: dict[str, Any] = {
        "target": "bitmig end-to-end rate (connect to durable ack) >= 0.8 x raw loopback TCP "
                  "(same bytes, same run)",
        "met": bool(ok and ratio >= 0.8),
        "state_dir": where, "bitmap_bytes": size, "pattern": "random p=0.5",
        "raw_tcp_s": [round(x, 4) for x in raw], "raw_tcp_gbps": round(raw_gbps, 3),
        "bitmig_s": [round(r["duration_s"], 4) for r in runs],
        "bitmig_gbps": round(mig_gbps, 3),
        "bitmig_bulk_phase_gbps": round(size / bulk / GB, 3) if bulk else None,
        "ratio": round(ratio, 3), "bytes_sent": best["bytes_sent"],
        "downtime_ms": round(best["downtime_ms"], 2), "phases": best["phases"],
        "digests_equal": all(r["digests_equal"] for r in runs), "ok": ok,
    }
    if where == "disk":
        # End to end includes the durable store, so on a disk slower than loopback the
        # disk is the bound: judged against min(raw TCP, the disk's own write + fdatasync).
        dw = await asyncio.to_thread(disk_write_s, where, size)
        bound_s = max(raw_best, dw)
        out["target"] = ("bitmig end-to-end rate (connect to durable ack) >= 0.8 x min(raw "
                         "loopback TCP, the disk's sequential write + fdatasync of the same "
                         "bytes), same run")
        out["disk_write_s"] = round(dw, 4)
        out["disk_write_gbps"] = round(size / dw / GB, 3)
        out["ratio_vs_bound"] = round(bound_s / best["duration_s"], 3)
        out["met"] = bool(ok and bound_s / best["duration_s"] >= 0.8)
    return out


async def throughput_disk(quick: bool) -> dict[str, Any]:
    return await throughput(quick, "disk")


# -- 2. downtime --------------------------------------------------------------------

# Absolute downtime targets (issue 10) by bitmap size: 256 MiB under 10,000 writes/s, and
# the default demo (32 MiB, 10 % dirty, 10,000 writes/s).
DOWNTIME_LIMIT_MS = {256 * MiB: 50.0, 32 * MiB: 15.0}


async def _downtime_row(size: int, where: str, quick: bool) -> dict[str, Any]:
    rate = 10_000.0
    words0 = bitmap_of(size, 0.10, seed=2).words
    disk = size * 8 * GRAN
    # Only the live run is traced (for the destination's side of its frozen window): the
    # trace's CRC-32 of every payload would lengthen stop-and-copy's window, not bitmig's.
    live = await migrate_once(DirtyBitmap(disk, GRAN, 1024, words=words0.copy()),
                              MigrationOptions(max_passes=p) if (p := _passes(quick)) else None,
                              write_rate=rate, where=where, trace=True)
    snc = await migrate_once(DirtyBitmap(disk, GRAN, 1024, words=words0),
                             MigrationOptions(small_threshold=NEVER_LIVE), write_rate=rate,
                             where=where)
    ratio = live["downtime_ms"] / snc["downtime_ms"] if snc["downtime_ms"] else 0.0
    bytes_ratio = live["bytes_sent"] / live["bitmap_bytes"]
    limit = DOWNTIME_LIMIT_MS.get(size)
    ok = bool(live["ok"] and snc["ok"] and live["digests_equal"] and snc["digests_equal"])
    met = ok and ratio <= 0.05 and bytes_ratio <= 1.3 and (
        limit is None or live["downtime_ms"] <= limit)
    return {"bitmap_bytes": size, "downtime_ms": round(live["downtime_ms"], 2),
            "limit_ms": limit, "stop_and_copy_ms": round(snc["downtime_ms"], 2),
            "ratio": round(ratio, 4), "bytes_ratio": round(bytes_ratio, 4),
            "passes": live["passes"], "forced": live["forced"],
            "writes_per_s": round(live["writes"] / max(
                1e-9, live["duration_s"] - live["downtime_ms"] / 1000)),
            "fsync_in_freeze_ms": live["freeze"].get("fsync_in_freeze_ms"),
            "dest_verify_ms": live["freeze"].get("dest_verify_ms"),
            "dest_store_ms": live["freeze"].get("dest_store_ms"),
            "dest_wait_ms": live["freeze"].get("dest_wait_ms"),
            "duration_s": round(live["duration_s"], 3),
            "stop_and_copy_s": round(snc["duration_s"], 3),
            "digests_equal": bool(live["digests_equal"] and snc["digests_equal"]),
            "ok": ok, "met": bool(met), "error": live["error"] or snc["error"]}


async def downtime(quick: bool, where: str = "tmpfs") -> dict[str, Any]:
    sizes = [32 * MiB] if quick else [256 * MiB, 32 * MiB]
    rows = [await _downtime_row(s, where, quick) for s in sizes]
    return {
        "target": "under 10,000 writes/s, 10 % dirty at start: downtime <= 0.05 x "
                  "stop-and-copy (same state dir); <= 50 ms for 256 MiB, <= 15 ms for 32 MiB "
                  "(the default demo); bytes_sent <= 1.3 x bitmap",
        "met": all(r["met"] for r in rows), "state_dir": where, "write_rate": 10_000.0,
        "dirty_at_start": 0.10, "sizes": rows, "ok": all(r["ok"] for r in rows),
    }


async def downtime_disk(quick: bool) -> dict[str, Any]:
    return await downtime(quick, "disk")


# -- 3. a thousand bitmaps ----------------------------------------------------------

SMALL = 128 * 1024  # one 64 GiB disk at 64 KiB


async def _child_run(size: int, count: int, write_rate: float, where: str, p: float = 0.1,
                     trace: bool = False, max_passes: int | None = None) -> dict[str, Any]:
    """Source in its own process (its peak RSS is its own), destination in another."""
    async with destination(where=where, trace=trace) as dest:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bitmig.tools.benchmarks.child", str(size), str(p),
            dest.host, str(dest.port), "--count", str(count), "--write-rate", str(write_rate),
            *(["--max-passes", str(max_passes)] if max_passes else []),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        lines = out.decode().strip().splitlines()
        if child.returncode or not lines:
            raise RuntimeError(f"benchmark source exited with {child.returncode}")
        src = json.loads(lines[-1])
        dest_hwm = proc_status(dest.proc.pid)["VmHWM"]
        keys = [tuple(k.split("/", 1)) for k in src["sha256"]]
        theirs = await dest_digests(dest.sock, keys)  # type: ignore[arg-type]
    src["dest_hwm"] = dest_hwm
    src["digests_equal"] = src["bitmaps_ok"] == count and src["sha256"] == theirs
    src["freeze"] = freeze_breakdown(dest.events) if trace else {}
    return src


async def thousand_bitmaps(quick: bool, where: str = "tmpfs") -> dict[str, Any]:
    count = 100 if quick else 1000
    rate = 10_000.0
    total = count * SMALL
    ref_size = -(-total // MiB) * MiB if quick else 128 * MiB
    passes = _passes(quick)
    many = await _child_run(SMALL, count, rate, where, trace=True, max_passes=passes)
    one = await _child_run(ref_size, 1, rate, where, max_passes=passes)
    limit_rss = 1.5 * total + 64 * MiB
    time_ratio = many["duration_s"] / one["duration_s"] if one["duration_s"] else 0.0
    ok = bool(many["ok"] and one["ok"] and many["digests_equal"] and one["digests_equal"])
    met = (ok and many["downtime_ms"] <= 50 and time_ratio <= 1.5
           and many["hwm"] <= limit_rss and many["dest_hwm"] <= limit_rss)
    return {
        "target": f"{count:,} bitmaps of 128 KiB (64 GiB disks at 64 KiB, 4 per node, 10 % "
                  "dirty) under 10,000 writes/s spread over them: downtime <= 50 ms; total "
                  f"time <= 1.5 x one {ref_size // MiB} MiB bitmap (same run); peak RSS per "
                  "daemon <= 1.5 x the bitmaps' total + 64 MiB",
        "met": bool(met), "state_dir": where, "bitmaps": count, "bitmap_bytes": total,
        "downtime_ms": round(many["downtime_ms"], 2), "limit_ms": 50.0,
        "frozen_total_ms": round(many["frozen_total_ms"], 2), "groups": many["groups"],
        "duration_s": round(many["duration_s"], 3),
        "one_bitmap_bytes": ref_size, "one_bitmap_s": round(one["duration_s"], 3),
        "one_bitmap_downtime_ms": round(one["downtime_ms"], 2),
        "time_ratio": round(time_ratio, 3),
        "skipped_live": many["skipped_live"], "passes": many["passes"],
        "forced": many["forced"], "frames": many["frames"], "bytes_sent": many["bytes_sent"],
        "fsync_in_freeze_ms": many["freeze"].get("fsync_in_freeze_ms"),
        "dest_verify_ms": many["freeze"].get("dest_verify_ms"),
        "dest_store_ms": many["freeze"].get("dest_store_ms"),
        "source_peak_rss": many["hwm"], "dest_peak_rss": many["dest_hwm"],
        "limit_rss": int(limit_rss), "digests_equal": bool(many["digests_equal"]),
        "ok": ok, "error": many["error"] or one["error"],
    }


async def thousand_bitmaps_disk(quick: bool) -> dict[str, Any]:
    return await thousand_bitmaps(quick, "disk")


# -- 4. wire bytes ------------------------------------------------------------------

WIRE_DISK = 2 << 40  # 2 TiB at 64 KiB: 2**25 bits, 4 MiB raw
SLOW_LINK_RATE = 4e6  # bytes per second of the slow_link scenario's proxy


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
    try:
        import pyroaring
    except ImportError:  # an optional package (the bench extra): say how to get it
        pyroaring = None
    rows = []
    for name, words in wire_patterns():
        raw = words.nbytes
        bm = DirtyBitmap(WIRE_DISK, GRAN, 1024, words=words)
        fast = sum(len(codec.encode_bytes(f)) for f in Planner(bm, 0).take_all())
        # What goes on a slow link (the slow_link scenario's 4 MB/s, as the session
        # measures it): the bytes that matter there.
        planner = Planner(bm, 0)
        planner.link_rate = SLOW_LINK_RATE
        frames = planner.take_all()
        mig = sum(len(codec.encode_bytes(f)) for f in frames)
        z1 = len(zlib.compress(words.tobytes(), 1))
        roar = None
        if pyroaring is not None:
            rb = pyroaring.BitMap(encodings.set_positions(words).astype(np.uint32))
            rb.run_optimize()
            roar = len(rb.serialize())
        best = min(z1, roar) if roar is not None else z1
        rows.append({"pattern": name, "raw": raw, "bitmig": mig, "bitmig_fast_link": fast,
                     "roaring": roar, "zlib1": z1, "frames": len(frames),
                     "bitmig_vs_best": mig - best, "bitmig_vs_raw": round(mig / raw, 4),
                     "met": roar is not None and mig <= best + 64})
    out: dict[str, Any] = {
        "target": "data frames on a slow link (4 MB/s) <= min(Roaring (portable, "
                  "run-optimized), zlib level 1) + 64 B for every pattern "
                  "(bitmig_fast_link: on loopback, where compressing would slow it)",
        "met": pyroaring is not None and all(r["met"] for r in rows),
        "disk": "2 TiB at 64 KiB (4 MiB raw)", "patterns": rows}
    if pyroaring is None:
        out["missing"] = f"pyroaring is not installed: {INSTALL_BENCH} for the Roaring column"
    return out


# -- 5. slow link -------------------------------------------------------------------


async def slow_link(quick: bool) -> dict[str, Any]:
    rate = SLOW_LINK_RATE
    gran = 16 * 1024
    nbytes = 2 * MiB if quick else 8 * MiB
    disk = nbytes * 8 * gran  # 8 MiB: a 1 TiB disk at 16 KiB
    bm = bitmap_of(nbytes, 0.10, gran, seed=6, disk_size=disk)
    raw_s = nbytes / rate
    limit_s = 0.7 * raw_s
    z1 = len(zlib.compress(bm.words.tobytes(), 1))
    r = await migrate_once(bm, write_rate=200.0,
                           via=lambda h, p: RateLimitProxy(h, p, rate))
    return {
        "target": f"completes in <= 0.7 x the time raw bytes need ({nbytes:,} B at 4 MB/s: "
                  f"{raw_s:.2f} s) = {limit_s:.2f} s",
        "met": bool(r["ok"] and r["digests_equal"] and r["duration_s"] <= limit_s),
        "disk": disk, "granularity": gran, "bitmap_bytes": nbytes, "link_bytes_per_s": rate,
        "write_rate": 200.0, "dirty_at_start": 0.10, "duration_s": round(r["duration_s"], 3),
        "limit_s": round(limit_s, 3), "raw_s": round(raw_s, 3),
        "time_ratio": round(r["duration_s"] / raw_s, 3),
        "downtime_ms": round(r["downtime_ms"], 1), "passes": r["passes"],
        "forced": r["forced"], "bytes_sent": r["bytes_sent"],
        "bytes_ratio": round(r["bytes_sent"] / nbytes, 4), "zlib1_bytes": z1,
        "digests_equal": r["digests_equal"], "ok": r["ok"],
    }


# -- 6/7. memory and scale: both sides in their own processes -----------------------

_pairs: dict[int, dict[str, Any]] = {}


async def migrate_processes(size: int) -> dict[str, Any]:
    """Source and destination each in a child process; memory of both (VmHWM). Cached:
    the memory and scale scenarios share the sizes they both measure."""
    if size not in _pairs:
        src = await _child_run(size, 1, 0.0, "tmpfs", p=0.5)
        _pairs[size] = {
            "bitmap_bytes": size, "ok": bool(src["ok"] and src["digests_equal"]),
            "duration_s": round(src["duration_s"], 3),
            "gbps": round(size / src["duration_s"] / GB, 3),
            "source_peak_rss": src["hwm"], "dest_peak_rss": src["dest_hwm"],
            "source_peak_x": round(src["hwm"] / size, 3),
            "dest_peak_x": round(src["dest_hwm"] / size, 3)}
    return dict(_pairs[size])


def _rss_row(r: dict[str, Any], factor: float, extra: int) -> dict[str, Any]:
    limit = factor * r["bitmap_bytes"] + extra
    r["limit_rss"] = int(limit)
    r["met"] = bool(r["ok"] and r["source_peak_rss"] <= limit and r["dest_peak_rss"] <= limit)
    return r


async def memory(quick: bool) -> dict[str, Any]:
    sizes = [16 * MiB, 32 * MiB] if quick else [256 * MiB, GiB]
    rows = [_rss_row(await migrate_processes(s), 1.5, 64 * MiB) for s in sizes]
    return {"target": "peak RSS <= 1.5 x bitmap + 64 MiB per daemon (source and destination "
                      "each in its own process, dense random bitmap)",
            "met": all(r["met"] for r in rows), "sizes": rows}


SCALE_S_PER_GIB = 0.6  # issue 10: 2 GiB durable and verified at the destination in 1.2 s


async def scale(quick: bool, sizes: list[int] | None = None) -> dict[str, Any]:
    sizes = sizes or ([4 * MiB, 32 * MiB] if quick else
                      [4 * MiB, 32 * MiB, 256 * MiB, GiB, 2 * GiB])
    rows = [_rss_row(await migrate_processes(s), 1.15, 48 * MiB) for s in sizes]
    for r in rows:
        r["limit_s"] = round(SCALE_S_PER_GIB * r["bitmap_bytes"] / GiB, 4)
        r["met"] = bool(r["met"] and r["duration_s"] <= r["limit_s"])
    top = max(rows, key=lambda r: r["bitmap_bytes"])
    large = [r["gbps"] for r in rows if r["bitmap_bytes"] >= 32 * MiB] or [r["gbps"] for r in rows]
    # Judged on the largest size (2 GiB in the full run): smaller ones carry the fixed
    # cost of setup (connect, process start-up memory) and are reported, not judged.
    return {"target": "largest size (2 GiB in the full run) durable and verified at the "
                      f"destination in <= {SCALE_S_PER_GIB} s per GiB (1.2 s for 2 GiB); peak "
                      "RSS per daemon <= 1.15 x bitmap + 48 MiB; every size migrates",
            "met": bool(all(r["ok"] for r in rows) and top["met"]),
            "rate_spread": round(max(large) / min(large), 2) if min(large) else None,
            "median_gbps": round(statistics.median(r["gbps"] for r in rows), 3),
            "sizes": rows, "ok": all(r["ok"] for r in rows)}


SCENARIOS = ("throughput", "throughput_disk", "downtime", "downtime_disk", "thousand_bitmaps",
             "thousand_bitmaps_disk", "wire_bytes", "slow_link", "memory", "scale")
