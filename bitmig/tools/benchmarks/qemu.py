"""Figures for QEMU interop, offline (issue 11): a 16 TiB disk at 64 KiB (a 32 MiB
bitmap) with 1 % and 50 % random bits. Times, each the median of --repeat runs:

- qemu_copy: QEMU's own copy of the bitmap between two images
  (`qemu-img bitmap --add -g 64K --merge b -b SRC -F qcow2 DST b`), the baseline;
- read: bitmig reading the bitmap from the closed image (qcow2.read_bitmaps);
- import: bitmig bringing it into an image (qemu_img.import_bitmap: fresh image written,
  one qemu-img add+merge call, read back and sha256 compared, fsync);

and read / qemu_copy, import / qemu_copy (target: <= 2).

    python -m bitmig.tools.benchmarks.qemu [--json] [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.qemu import qcow2, qemu_img
from bitmig.qemu.qcow2 import ImageBitmap

TiB = 1 << 40
GRANULARITY = 64 << 10


def _create(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True, capture_output=True)


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(disk: int, fill: float, repeat: int, tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    bm = DirtyBitmap(disk, GRANULARITY)
    bm.fill_random(fill, rng)
    # The source image is written by QEMU (merged from one of ours), as a user's would be.
    ours = tmp / "ours.qcow2"
    qcow2.write_bitmap_image(ours, disk, [ImageBitmap("b", GRANULARITY, True, False, bm.words)])
    src = tmp / "src.qcow2"
    _create(src, disk)
    qemu_img.bitmap(src, "b", ["--add", "-g", str(GRANULARITY), "--merge", "b", "-b", str(ours),
                               "-F", "qcow2"])
    ours.unlink()
    copy_t, read_t, import_t = [], [], []
    for i in range(repeat):
        dst = tmp / f"qemu{i}.qcow2"
        _create(dst, disk)
        copy_t.append(_timed(lambda dst=dst: qemu_img.bitmap(
            dst, "b", ["--add", "-g", str(GRANULARITY), "--merge", "b", "-b", str(src),
                       "-F", "qcow2"])))
        dst.unlink()
        t = time.perf_counter()
        got = qcow2.read_bitmaps(src, ["b"])[0]
        read_t.append(time.perf_counter() - t)
        assert got.sha256() == bm.sha256()
        dst = tmp / f"ours{i}.qcow2"
        _create(dst, disk)
        t = time.perf_counter()
        qemu_img.import_bitmap(dst, got, tmpdir=str(tmp))
        import_t.append(time.perf_counter() - t)
        dst.unlink()
    c, r, m = (statistics.median(x) for x in (copy_t, read_t, import_t))
    return {"disk_size": disk, "granularity": GRANULARITY, "bitmap_bytes": bm.serialized_size,
            "fill": fill, "count": bm.count(), "qemu_copy_s": round(c, 4),
            "read_s": round(r, 4), "import_s": round(m, 4),
            "read_ratio": round(r / c, 2), "import_ratio": round(m / c, 2)}


def run(quick: bool = False, repeat: int = 3) -> list[dict[str, Any]]:
    disk = TiB if quick else 16 * TiB
    with tempfile.TemporaryDirectory(prefix="bitmig-bench-qemu-") as d:
        return [measure(disk, fill, repeat, Path(d)) for fill in (0.01, 0.5)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitmig.tools.benchmarks.qemu",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 TiB disk (2 MiB bitmap)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    try:
        rows = run(a.quick, max(1, a.repeat))
    except (qcow2.Qcow2Error, subprocess.CalledProcessError, OSError) as e:
        print(f"bench qemu: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(rows))
        return 0
    print(f"{'fill':>5} {'qemu copy':>10} {'read':>8} {'import':>8} {'read/qemu':>10} "
          f"{'import/qemu':>12}")
    for r in rows:
        print(f"{r['fill']:>5.0%} {r['qemu_copy_s']:>9.3f}s {r['read_s']:>7.3f}s "
              f"{r['import_s']:>7.3f}s {r['read_ratio']:>10.2f} {r['import_ratio']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
