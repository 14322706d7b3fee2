"""qcow2 images, offline: bitmig's reader and writer checked against QEMU itself
(qemu-img info/check, qemu-storage-daemon's x-debug-block-dirty-bitmap-sha256), the
image -> bitmig source -> bitmig dest -> image path end to end, and the refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from destproc import DestProcess
from qsd import HAVE_QEMU, StorageDaemon, qemu_sha256s

from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol.spec import ErrorCode
from bitmig.qemu import qcow2, qemu_img
from bitmig.qemu.image import ImageTarget, load_image_bitmaps
from bitmig.qemu.mapping import Mapping, MappingError, parse_rule
from bitmig.qemu.qcow2 import ImageBitmap
from bitmig.session.target import Incoming, TargetError

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img, qemu-io and "
                                "qemu-storage-daemon (qemu-utils, qemu-system-common)")

BITMIG = [sys.executable, "-m", "bitmig"]
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def sh(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (args, p.stderr)
    return p.stdout


def create(path: Path, size: int, cluster_size: int = 64 * KiB) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
       str(path), str(size))
    return path


def qemu_view(path: Path) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, granularity, flags) of each bitmap, as qemu-img info reports them."""
    bms = qemu_img.image_bitmaps(path)
    return sorted((b["name"], b["granularity"], tuple(sorted(b["flags"]))) for b in bms)


def random_writes(path: Path, size: int, rng: np.random.Generator, n: int) -> None:
    cmds = []
    for _ in range(n):
        length = min(int(rng.integers(1, 64)) * 4096, size)
        off = int(rng.integers(0, (size - length) // 512 + 1)) * 512
        cmds += ["-c", f"write {off} {length}"]
    sh("qemu-io", "-f", "qcow2", *cmds, str(path))


def make_source_image(path: Path, size: int = 4 * GiB, seed: int = 1) -> Path:
    """Three bitmaps: 'daily' (64 KiB, enabled, random writes), 'weekly' (1 MiB, the same
    writes, then disabled) and 'empty' (64 KiB, enabled, added after the writes)."""
    create(path, size)
    sh("qemu-img", "bitmap", "--add", "-g", "64K", str(path), "daily")
    sh("qemu-img", "bitmap", "--add", "-g", "1M", str(path), "weekly")
    random_writes(path, size, np.random.default_rng(seed), 200)
    sh("qemu-img", "bitmap", "--disable", str(path), "weekly")
    sh("qemu-img", "bitmap", "--add", "-g", "64K", str(path), "empty")
    return path


@pytest.fixture
def src_image(tmp_path: Path) -> Path:
    return make_source_image(tmp_path / "vda.qcow2")


# -- reader and writer against QEMU ------------------------------------------------------


def test_reader_equals_qemu_on_the_three_bitmap_image(src_image: Path) -> None:
    ours = {b.name: b for b in qcow2.read_bitmaps(src_image)}
    assert qemu_view(src_image) == sorted(
        (b.name, b.granularity, ("auto",) if b.enabled else ()) for b in ours.values())
    assert {n: b.sha256().hex() for n, b in ours.items()} == qemu_sha256s(src_image)
    assert ours["daily"].count() > 0 and ours["weekly"].count() > 0
    assert ours["empty"].count() == 0 and not ours["weekly"].enabled


@pytest.mark.parametrize("seed", range(6))
def test_reader_equals_qemu_on_random_images(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    cluster = 1 << int(rng.integers(9, 17))  # 512 B .. 64 KiB clusters
    size = int(rng.integers(1, 1 << 21)) * 512  # any multiple of 512 up to 1 GiB
    img = create(tmp_path / "r.qcow2", size, cluster)
    names = []
    for i in range(int(rng.integers(1, 5))):
        g = 1 << int(rng.integers(9, 20))  # small ones span several bitmap clusters
        names.append(f"bm{i}-{g}")
        sh("qemu-img", "bitmap", "--add", "-g", str(g), str(img), names[-1])
    random_writes(img, size, rng, int(rng.integers(0, 40)))
    if rng.random() < 0.5:  # a long write: whole bitmap clusters of ones
        sh("qemu-io", "-f", "qcow2", "-c", f"write -z 0 {min(size, 16 * MiB)}", str(img))
    ours = {b.name: b.sha256().hex() for b in qcow2.read_bitmaps(img)}
    assert ours == qemu_sha256s(img)


def random_bitmap(rng: np.random.Generator, name: str, size: int, g: int) -> ImageBitmap:
    bm = DirtyBitmap(size, g)
    kind = rng.integers(0, 4)
    if kind == 1:
        bm.fill_random(float(rng.random()), rng)
    elif kind == 2:  # all ones: whole clusters become table flags
        bm.set(0, size)
    elif kind == 3:  # runs: all-zero, all-one and mixed clusters side by side
        for _ in range(20):
            a = int(rng.integers(0, size))
            bm.set(a, int(rng.integers(1, size - a + 1)))
    return ImageBitmap(name, g, bool(rng.random() < 0.7), False, bm.words)


@pytest.mark.parametrize("seed", range(6))
def test_written_image_is_clean_and_holds_the_bits_for_qemu(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    size = int(rng.integers(1, 1 << 24)) * 512 if seed else 20 * TiB  # 20 TiB: 5 L1 clusters
    bms = [random_bitmap(rng, f"b{i}", size, 1 << int(rng.integers(16 if seed == 0 else 9, 22)))
           for i in range(int(rng.integers(1, 5)))]
    img = tmp_path / "w.qcow2"
    qcow2.write_bitmap_image(img, size, bms)
    qemu_img.check(img)  # raises unless clean (no leaks, no corruption)
    assert qemu_img.info(img)["virtual-size"] == size
    assert qemu_view(img) == sorted(
        (b.name, b.granularity, ("auto",) if b.enabled else ()) for b in bms)
    assert qemu_sha256s(img) == {b.name: b.sha256().hex() for b in bms}
    back = {b.name: b for b in qcow2.read_bitmaps(img)}
    for b in bms:
        assert np.array_equal(back[b.name].words, b.words)


def test_writer_never_writes_over_an_existing_file(src_image: Path) -> None:
    before = src_image.read_bytes()
    with pytest.raises(qcow2.Qcow2Error, match="already exists"):
        qcow2.write_bitmap_image(src_image, 4 * GiB, [])
    assert src_image.read_bytes() == before


# -- end to end: image -> bitmig source -> bitmig dest -> image ------------------------


def run_bitmig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BITMIG, *args], capture_output=True, text=True, timeout=300)


def test_image_to_image_through_source_and_dest(src_image: Path, tmp_path: Path) -> None:
    before = src_image.read_bytes()
    src_sums = qemu_sha256s(src_image)
    dest = DestProcess(tmp_path / "dest-state", tmp_path)
    port = dest.start()
    try:
        src = run_bitmig("source", "--qcow2", str(src_image), "--control",
                         str(tmp_path / "src.sock"), "--migrate-to", f"127.0.0.1:{port}")
        assert src.returncode == 0, src.stderr
        result = json.loads(src.stdout.strip().splitlines()[-1])
        assert result["ok"] and {b["name"] for b in result["bitmaps"]} == set(src_sums)
        assert {b["node"] for b in result["bitmaps"]} == {"vda"}  # the image's stem
    finally:
        dest.stop()
    out_image = create(tmp_path / "out.qcow2", 4 * GiB)
    imp = run_bitmig("qemu", "import", str(out_image), "--state-dir",
                     str(tmp_path / "dest-state"), "--json")
    assert imp.returncode == 0, imp.stderr
    assert len(json.loads(imp.stdout)["bitmaps"]) == 3
    # QEMU's view of the result: same names, granularities, flags, bits; image clean
    assert qemu_view(out_image) == qemu_view(src_image)
    qemu_img.check(out_image)
    assert qemu_sha256s(out_image) == src_sums
    assert src_image.read_bytes() == before  # the source image was only read


def test_export_then_import_with_a_mapping(src_image: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ex = run_bitmig("qemu", "export", str(src_image), "--state-dir", str(state),
                    "--node", "drive0", "--bitmap", "daily", "--json")
    assert ex.returncode == 0, ex.stderr
    [b] = json.loads(ex.stdout)["bitmaps"]
    assert (b["node"], b["name"]) == ("drive0", "daily")
    assert b["sha256"] == qemu_sha256s(src_image)["daily"]
    out_image = create(tmp_path / "out.qcow2", 4 * GiB)
    imp = run_bitmig("qemu", "import", str(out_image), "--state-dir", str(state),
                     "--map", "drive0:daily=:daily-moved")
    assert imp.returncode == 0, imp.stderr
    assert qemu_sha256s(out_image) == {"daily-moved": b["sha256"]}
    listing = json.loads(run_bitmig("qemu", "list", str(out_image), "--json").stdout)
    assert [(x["name"], x["sha256"]) for x in listing["bitmaps"]] == [
        ("daily-moved", b["sha256"])]


@pytest.mark.parametrize("cmd", ["list", "export", "import"])
def test_qemu_commands_have_help(cmd: str) -> None:
    out = run_bitmig("qemu", cmd, "--help")
    assert out.returncode == 0 and f"usage: bitmig qemu {cmd}" in out.stdout


# -- refusals -----------------------------------------------------------------------------


def in_use_copy(image: Path, dest: Path) -> Path:
    """A copy of `image` taken while qemu-storage-daemon has it open read-write: its
    bitmaps are flagged in_use, as after a crash of QEMU."""
    with StorageDaemon([image], read_only=False):
        shutil.copyfile(image, dest)
    return dest


def test_in_use_bitmaps_are_refused(src_image: Path, tmp_path: Path) -> None:
    stale = in_use_copy(src_image, tmp_path / "stale.qcow2")
    assert all(e.in_use for e in qcow2.read_header(stale).bitmaps)
    with pytest.raises(qcow2.BitmapInUseError, match="in use"):
        qcow2.read_bitmaps(stale, ["daily"])
    src = run_bitmig("source", "--qcow2", str(stale), "--control", str(tmp_path / "s.sock"),
                     "--migrate-to", "127.0.0.1:9")
    assert src.returncode == 2 and "is in use" in src.stderr
    ex = run_bitmig("qemu", "export", str(stale), "--state-dir", str(tmp_path / "st"))
    assert ex.returncode == 1 and "in use" in ex.stderr
    assert not list((tmp_path / "st" / "bitmaps").glob("*"))  # nothing stored
    listing = json.loads(run_bitmig("qemu", "list", str(stale), "--json").stdout)
    assert all(b["in_use"] and "sha256" not in b for b in listing["bitmaps"])
    # and while QEMU holds the image, nothing goes in either
    with StorageDaemon([src_image], read_only=False):
        bm = ImageBitmap("new", 65536, True, False,
                         np.zeros(qcow2.bitmap_words(4 * GiB, 65536), dtype="<u8"))
        with pytest.raises(qcow2.Qcow2Error):
            qemu_img.import_bitmap(src_image, bm)
    assert "new" not in {b["name"] for b in qemu_img.image_bitmaps(src_image)}


def test_name_clash_is_refused_and_replace_replaces(src_image: Path, tmp_path: Path) -> None:
    dst = make_source_image(tmp_path / "dst.qcow2", seed=7)
    before = qemu_sha256s(dst)
    new = qcow2.read_bitmaps(src_image, ["daily"])[0]
    with pytest.raises(qemu_img.BitmapExistsError, match="exists"):
        qemu_img.import_bitmap(dst, new)
    assert qemu_sha256s(dst) == before
    r = qemu_img.import_bitmap(dst, new, replace=True)
    assert r.replaced and qemu_sha256s(dst) == before | {"daily": new.sha256().hex()}
    qemu_img.check(dst)


def test_failed_import_leaves_the_image_as_it_was(
    src_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = make_source_image(tmp_path / "dst.qcow2", seed=7)
    view, sums = qemu_view(dst), qemu_sha256s(dst)

    def fail(image: str) -> None:
        raise qcow2.Qcow2Error("disk full (simulated)")

    monkeypatch.setattr(qemu_img, "_sync", fail)
    new = qcow2.read_bitmaps(src_image, ["daily", "weekly"])
    with pytest.raises(qemu_img.QemuImgError, match="left as it was"):
        qemu_img.import_bitmap(dst, ImageBitmap("fresh", 65536, True, False, new[0].words))
    with pytest.raises(qemu_img.QemuImgError, match="left as it was"):
        qemu_img.import_bitmap(dst, new[1], replace=True)  # replaces 'weekly', then fails
    assert qemu_view(dst) == view and qemu_sha256s(dst) == sums
    qemu_img.check(dst)


def test_not_qcow2_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", str(raw), "1G")
    with pytest.raises(qcow2.NotQcow2Error, match="not a qcow2 image"):
        qcow2.read_bitmaps(raw)
    for args in (["source", "--qcow2", str(raw), "--control", str(tmp_path / "s.sock")],
                 ["qemu", "export", str(raw), "--state-dir", str(tmp_path / "st")],
                 ["qemu", "list", str(raw)]):
        out = run_bitmig(*args)
        assert out.returncode in (1, 2) and "not a qcow2 image" in out.stderr, out.stderr
    out = run_bitmig("qemu", "list", str(tmp_path / "missing.qcow2"), "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["error"].endswith("no such image")
    with pytest.raises(qcow2.Qcow2Error):
        ImageTarget(raw)


def test_inconsistent_extension_is_refused(src_image: Path, tmp_path: Path) -> None:
    """autoclear bit 0 cleared (what a program without bitmap support does): QEMU ignores
    every bitmap, and bitmig refuses the image with a clear error."""
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(src_image, copy)
    with open(copy, "r+b") as f:
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))
    assert qemu_img.image_bitmaps(copy) == []  # QEMU's view: the bitmaps are gone
    with pytest.raises(qcow2.InconsistentError, match="autoclear bit 0"):
        qcow2.read_bitmaps(copy)


def test_broken_bitmap_table_is_refused(src_image: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(src_image, copy)
    e = qcow2.read_header(copy).find("daily")
    with open(copy, "r+b") as f:
        f.seek(e.table_offset)
        f.write(struct.pack(">Q", 1 << 45))  # a data cluster at 32 TiB: past EOF
    with pytest.raises(qcow2.InconsistentError, match="past the end"):
        qcow2.read_bitmaps(copy, ["daily"])


def test_qcow2_limits_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(qcow2.LimitError, match="granularity"):
        qcow2.check_bitmap_limits(GiB, 256, "x")
    with pytest.raises(qcow2.LimitError, match="granularity"):
        qcow2.check_bitmap_limits(GiB, 4 * GiB, "x")
    with pytest.raises(qcow2.LimitError, match="1023"):
        qcow2.check_bitmap_limits(GiB, 65536, "n" * 1024)
    qcow2.check_bitmap_limits(GiB, 65536, "n" * 1023)
    with pytest.raises(qcow2.LimitError, match="65535"):
        qcow2.write_bitmap_image(tmp_path / "x.qcow2", GiB, [None] * 65536)  # type: ignore
    assert not (tmp_path / "x.qcow2").exists()
    # a bitmap qcow2 cannot hold: 4 TiB at 512 B is 1 GiB of bits (> 512 MiB)
    big = create(tmp_path / "big.qcow2", 4 * TiB)
    target = ImageTarget(big)
    with pytest.raises(TargetError) as ei:
        asyncio.run(target.check(Incoming("big", "b", 4 * TiB, 512, True, True)))
    assert ei.value.code is ErrorCode.LIMIT and "exceeds qcow2's limit" in ei.value.message
    # the 65535-bitmap limit of an image (lowered here: 65535 real bitmaps take minutes)
    img = make_source_image(tmp_path / "three.qcow2")
    monkeypatch.setattr(qcow2, "MAX_BITMAPS", 3)
    with pytest.raises(qcow2.LimitError, match="already holds 3 bitmaps"):
        qemu_img.check_import(img, "fourth", 65536)


# -- the destination's target -----------------------------------------------------------


def incoming(name: str, g: int = 65536, size: int = 4 * GiB, enabled: bool = True,
             node: str = "vda") -> Incoming:
    return Incoming(node, name, size, g, enabled, True)


def test_image_target_check_and_deliver(src_image: Path, tmp_path: Path) -> None:
    out = create(tmp_path / "out.qcow2", 4 * GiB)
    target = ImageTarget(out, Mapping([parse_rule("vda:daily=drive0:d2")]), node="drive0")
    loaded = {lb.image.name: lb for lb in load_image_bitmaps(src_image)}

    async def scenario() -> None:
        daily = incoming("daily")
        await target.check(daily)
        await target.deliver(daily, loaded["daily"].bitmap)
        await target.deliver(daily, loaded["daily"].bitmap)  # a retry: already there, same
        with pytest.raises(TargetError) as ei:
            await target.check(daily)
        assert ei.value.code is ErrorCode.EXISTS
        with pytest.raises(TargetError) as ei:  # 'weekly' maps to node vda: not this target
            await target.check(incoming("weekly", 1 << 20, enabled=False))
        assert ei.value.code is ErrorCode.STORAGE and "unknown node" in ei.value.message
        with pytest.raises(TargetError) as ei:
            await target.check(Incoming("drive0", "x", 8 * GiB, 65536, True, True))
        assert ei.value.code is ErrorCode.LIMIT and "virtual size" in ei.value.message
        other = ImageBitmap("d2", 65536, True, False, loaded["empty"].bitmap.words)
        with pytest.raises(TargetError) as ei:  # different bits under a delivered name
            await target.deliver(daily, other.to_dirty_bitmap(4 * GiB))
        assert ei.value.code is ErrorCode.EXISTS

    asyncio.run(scenario())
    assert qemu_sha256s(out) == {"d2": qemu_sha256s(src_image)["daily"]}
    qemu_img.check(out)


# -- mapping --------------------------------------------------------------------------------


def test_mapping_rules(tmp_path: Path) -> None:
    m = Mapping.parse(["vda=drive0", "vdb:daily=vdc:old", "vdb:x=:y"])
    assert m.map("vda", "a") == ("drive0", "a")
    assert m.map("vdb", "daily") == ("vdc", "old")
    assert m.map("vdb", "x") == ("vdb", "y")
    assert m.map("vdb", "other") == ("vdb", "other")
    f = tmp_path / "map.json"
    f.write_text(json.dumps([{"node": "a", "name": "b", "dest-name": "c=d"}]))
    assert Mapping.parse([f"@{f}"]).map("a", "b") == ("a", "c=d")
    assert Mapping.parse([f"@{f}"]).to_json() == [{"node": "a", "name": "b",
                                                   "dest-name": "c=d"}]
    for bad in ("novalue", "=x", "vda=:name", "a:" + "n" * 1024 + "=b"):
        with pytest.raises(MappingError):
            parse_rule(bad)
    f.write_text('{"node": "a"}')
    with pytest.raises(MappingError, match="list"):
        Mapping.parse([f"@{f}"])
    with pytest.raises(MappingError, match="No such file"):
        Mapping.parse([f"@{tmp_path / 'nope'}"])



def test_bench_qemu_runs_and_checks_its_copies() -> None:
    """Not a timing test: the figures' script runs and every copy it times is verified."""
    out = run_bitmig_module("bitmig.tools.benchmarks.qemu", "--quick", "--repeat", "1", "--json")
    rows = json.loads(out)
    assert [r["fill"] for r in rows] == [0.01, 0.5]
    assert all(r["bitmap_bytes"] == 2 * MiB and r["count"] > 0 for r in rows)


def run_bitmig_module(module: str, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout
