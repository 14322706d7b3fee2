"""Live-QEMU figures (issue 11): reading a bitmap from a running qemu-storage-daemon and
bringing one into it, each as a ratio to QEMU's own copy of the same bitmap between two
closed images (`qemu-img bitmap --add --merge SRC -b IMAGE`), measured in the same run.

    python3 -m bitmig.tools.benchmarks.qemu_live [--disk-size 16T] [--granularity 64K]
        [--fraction 0.01 --fraction 0.5] [--repeat 3] [--json]

Not a test: timings depend on the machine. Each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.units import parse_size
from bitmig.qemu.live import LiveSource
from bitmig.qemu.live_target import LiveTarget
from bitmig.qemu.qcow2 import ImageBitmap, write_bitmap_image
from bitmig.session.target import Incoming


def start_qsd(workdir: Path, tag: str, image: Path) -> tuple[str, int]:
    qmp = str(workdir / f"{tag}.sock")
    pidfile = workdir / f"{tag}.pid"
    subprocess.run(["qemu-storage-daemon",
                    "--blockdev", f"driver=file,filename={image},node-name={tag}-f",
                    "--blockdev", f"driver=qcow2,file={tag}-f,node-name=disk0",
                    "--chardev", f"socket,path={qmp},server=on,wait=off,id=m0",
                    "--monitor", "chardev=m0", "--daemonize", "--pidfile", str(pidfile)],
                   check=True, timeout=120)
    return qmp, int(pidfile.read_text())


def stop_qsd(pid: int) -> None:
    import select
    import signal

    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([fd], [], [], 120)
    finally:
        os.close(fd)


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        times.append(fn())
    return min(times)


def run(disk: int, gran: int, fraction: float, repeat: int, work: Path) -> dict[str, Any]:
    bm = DirtyBitmap(disk, gran)
    bm.fill_random(fraction, np.random.default_rng(1))
    src_img = work / "src.qcow2"
    write_bitmap_image(src_img, disk, [ImageBitmap("b", gran, True, False, bm.words)])

    def qemu_copy() -> float:
        dst = work / "qemu-dst.qcow2"
        dst.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), str(disk)],
                       check=True)
        t = time.perf_counter()
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(gran), "--merge", "b",
                        "-b", str(src_img), "-F", "qcow2", str(dst), "b"], check=True)
        return time.perf_counter() - t

    qemu_s = best(qemu_copy, repeat)

    # Read from a live qemu-storage-daemon: the first consistent copy (transaction with
    # a recording bitmap, temporary node, blockdev-del, read the file).
    qmp, pid = start_qsd(work, "a", src_img)
    try:
        def live_read() -> float:
            async def go() -> float:
                s = LiveSource(qmp, workdir=str(work))
                await s.open()
                t = time.perf_counter()
                await s.snapshot()
                dt = time.perf_counter() - t
                assert s.bitmaps[0].bitmap is not None
                assert s.bitmaps[0].bitmap.sha256() == bm.sha256()
                t = time.perf_counter()
                await s.poll()  # a delta with no write: the fixed cost of one poll
                polls.append(time.perf_counter() - t)
                await s.close()
                return dt
            return asyncio.run(go())

        polls: list[float] = []
        read_s = best(live_read, repeat)
    finally:
        stop_qsd(pid)

    # Bring into a live qemu-storage-daemon (replace: the same name each repeat).
    dst_img = work / "b.qcow2"
    dst_img.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst_img), str(disk)],
                   check=True)
    qmp, pid = start_qsd(work, "b", dst_img)
    try:
        def live_write() -> float:
            async def go() -> float:
                t0 = LiveTarget(qmp, replace=True, workdir=str(work))
                inc = Incoming("disk0", "b", disk, gran, True, True)
                t = time.perf_counter()
                await t0.deliver(inc, bm)  # includes QEMU's sha256 check
                dt = time.perf_counter() - t
                await t0.close()
                return dt
            return asyncio.run(go())

        write_s = best(live_write, repeat)
    finally:
        stop_qsd(pid)
    return {"disk_size": disk, "granularity": gran, "fraction": fraction,
            "bitmap_bytes": bm.serialized_size, "set_bits": bm.count(),
            "qemu_img_merge_s": round(qemu_s, 4),
            "live_read_s": round(read_s, 4), "live_read_ratio": round(read_s / qemu_s, 2),
            "live_empty_delta_s": round(min(polls), 4),
            "live_deliver_s": round(write_s, 4),
            "live_deliver_ratio": round(write_s / qemu_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bitmig.tools.benchmarks.qemu_live",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--disk-size", type=parse_size, default=parse_size("16T"))
    p.add_argument("--granularity", type=parse_size, default=parse_size("64K"))
    p.add_argument("--fraction", type=float, action="append", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitmig-bench-qemu-") as d:
        for f in a.fraction or [0.01, 0.5]:
            sub = Path(d) / f"f{f}"
            sub.mkdir()
            rows.append(run(a.disk_size, a.granularity, f, a.repeat, sub))
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['fraction']:>5.0%} bits of {r['bitmap_bytes'] >> 20} MiB: qemu-img merge "
                  f"{r['qemu_img_merge_s'] * 1000:7.1f} ms | live read "
                  f"{r['live_read_s'] * 1000:7.1f} ms ({r['live_read_ratio']:.2f}x) | live "
                  f"deliver {r['live_deliver_s'] * 1000:7.1f} ms "
                  f"({r['live_deliver_ratio']:.2f}x) | empty delta "
                  f"{r['live_empty_delta_s'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
