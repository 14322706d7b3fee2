"""Thin wrappers over `qemu-img`, and bringing a bitmap into a user's image with it.

A user's image is only ever changed by qemu-img (QEMU's own code): bitmig writes the
bitmap into a fresh image of its own (qcow2.write_bitmap_image) and one `qemu-img bitmap`
call adds the bitmap to the user's image and merges the bits in from that fresh image.
The result is read back and compared (sha256, granularity, enabled); on any failure the
image is put back as it was, again through qemu-img.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitmig.qemu import qcow2
from bitmig.qemu.qcow2 import ImageBitmap, Qcow2Error

QEMU_IMG_TIMEOUT = 600.0  # seconds; a merge of a 512 MiB bitmap takes a few seconds


class QemuImgError(Qcow2Error):
    """qemu-img is missing or failed; the message carries its own error text."""


class BitmapExistsError(Qcow2Error):
    """The image already holds a bitmap of that name (and replace was not asked)."""


def qemu_img_binary() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise QemuImgError("qemu-img not found on PATH (install qemu-utils)")
    return path


def run(args: list[str], timeout: float = QEMU_IMG_TIMEOUT) -> str:
    """Run qemu-img with `args`; its stdout, or QemuImgError with its stderr."""
    cmd = [qemu_img_binary(), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise QemuImgError(f"qemu-img {args[0]} timed out after {timeout:.0f} s") from None
    except OSError as e:
        raise QemuImgError(f"cannot run qemu-img: {e}") from None
    if p.returncode != 0:
        msg = " ".join(line.strip() for line in p.stderr.splitlines() if line.strip())
        raise QemuImgError(f"qemu-img {args[0]} failed: {msg or f'exit {p.returncode}'}")
    return p.stdout


def _existing(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.exists():
        raise Qcow2Error(f"{path}: no such image")
    if p.is_dir():
        raise qcow2.NotQcow2Error(f"{path}: is a directory, not a qcow2 image")
    return str(p)


def info(path: str | os.PathLike[str], force_share: bool = True) -> dict[str, Any]:
    """`qemu-img info --output=json` (with -U: readable while QEMU holds the image)."""
    path = _existing(path)
    args = ["info", "--output=json", *(["-U"] if force_share else []), path]
    try:
        return json.loads(run(args))
    except json.JSONDecodeError as e:
        raise QemuImgError(f"qemu-img info printed no JSON: {e}") from None


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`qemu-img check --output=json -f qcow2`; raises QemuImgError if not clean."""
    path = _existing(path)
    cmd = [qemu_img_binary(), "check", "--output=json", "-f", "qcow2", path]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT,
                           check=False)
    except subprocess.TimeoutExpired:
        raise QemuImgError(f"qemu-img check timed out after {QEMU_IMG_TIMEOUT:.0f} s") from None
    except OSError as e:
        raise QemuImgError(f"cannot run qemu-img: {e}") from None
    try:
        result = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise QemuImgError(f"qemu-img check failed: {p.stderr.strip()}") from None
    if p.returncode != 0:
        raise QemuImgError(f"qemu-img check found problems in {path}: {result}")
    return result


def image_bitmaps(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The bitmaps qemu-img reports: name, granularity, flags (["auto"], ["in-use"])."""
    data = info(path)
    if data.get("format") != "qcow2":
        raise qcow2.NotQcow2Error(f"{path}: format {data.get('format')!r}, not qcow2")
    return list(data.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def bitmap(path: str | os.PathLike[str], name: str, ops: list[str]) -> None:
    """One `qemu-img bitmap -f qcow2 OPS... PATH NAME` call (ops apply in order)."""
    run(["bitmap", "-f", "qcow2", *ops, _existing(path), name])


@dataclass(frozen=True)
class ImportResult:
    image: str
    name: str
    granularity: int
    enabled: bool
    count: int
    sha256: str
    replaced: bool


def check_import(
    image: str | os.PathLike[str], name: str, granularity: int, disk_size: int | None = None,
    *, replace: bool = False,
) -> qcow2.ImageHeader:
    """Refuse early what import_bitmap would refuse; the image's header on success."""
    header = qcow2.read_header(_existing(image))
    qcow2.check_bitmap_limits(header.virtual_size, granularity, name, header.cluster_size)
    if disk_size is not None and disk_size != header.virtual_size:
        raise qcow2.LimitError(
            f"{image}: virtual size {header.virtual_size} B differs from the bitmap's disk "
            f"size {disk_size} B"
        )
    old = header.find(name)
    if old is not None:
        if old.in_use:
            raise qcow2.BitmapInUseError(
                f"{image}: bitmap {name!r} is in use (QEMU has the image open)"
            )
        if not replace:
            raise BitmapExistsError(
                f"{image}: a bitmap named {name!r} exists (ask to replace it)"
            )
    elif len(header.bitmaps) >= qcow2.MAX_BITMAPS:
        raise qcow2.LimitError(f"{image}: already holds {qcow2.MAX_BITMAPS} bitmaps")
    return header


def import_bitmap(
    image: str | os.PathLike[str],
    bm: ImageBitmap,
    *,
    replace: bool = False,
    tmpdir: str | None = None,
) -> ImportResult:
    """Bring `bm` into the user's `image` as a persistent bitmap, through qemu-img only.

    Refusals (nothing changed): BitmapExistsError, BitmapInUseError, LimitError,
    NotQcow2Error. Any later failure puts the image back as it was (the added bitmap
    removed, a replaced one restored) and raises QemuImgError.
    """
    image = _existing(image)
    header = check_import(image, bm.name, bm.granularity, replace=replace)
    nwords = qcow2.bitmap_words(header.virtual_size, bm.granularity)
    if bm.words.shape != (nwords,):
        raise qcow2.LimitError(
            f"{image}: bitmap {bm.name!r} has {bm.words.size} words, the image's size "
            f"({header.virtual_size} B) needs {nwords}"
        )
    old_entry = header.find(bm.name)
    # What to restore on failure: the old bitmap's bits, read before anything changes.
    old = qcow2.read_bitmaps(image, [bm.name])[0] if old_entry is not None else None
    with tempfile.TemporaryDirectory(prefix="bitmig-qcow2-", dir=tmpdir) as tmp:
        try:
            _add_merge(image, header.virtual_size, bm, Path(tmp) / "new.qcow2", old is not None)
            got = qcow2.read_bitmaps(image, [bm.name])[0]
            if (got.sha256(), got.granularity, got.enabled) != (
                bm.sha256(), bm.granularity, bm.enabled
            ):
                raise QemuImgError(
                    f"{image}: bitmap {bm.name!r} read back differs from what was merged in"
                )
            _sync(image)
        except Qcow2Error as e:
            _restore(image, header.virtual_size, bm.name, old, Path(tmp) / "old.qcow2", e)
            raise QemuImgError(f"{e} (the image was left as it was)") from None
    return ImportResult(image, bm.name, bm.granularity, bm.enabled, got.count(),
                        got.sha256().hex(), old is not None)


def _add_merge(image: str, size: int, bm: ImageBitmap, tmp: Path, remove_first: bool) -> None:
    # The fresh image holds the bits under a fixed name; one qemu-img call removes the old
    # bitmap (replace), adds the new one, merges the bits in and disables it if need be.
    qcow2.write_bitmap_image(tmp, size, [ImageBitmap("bitmig", bm.granularity, True, False,
                                                     bm.words)])
    ops = ["--remove"] if remove_first else []
    ops += ["--add", "-g", str(bm.granularity), "--merge", "bitmig", "-b", str(tmp),
            "-F", "qcow2"]
    if not bm.enabled:
        ops.append("--disable")
    bitmap(image, bm.name, ops)


def _restore(
    image: str, size: int, name: str, old: ImageBitmap | None, tmp: Path, cause: Exception
) -> None:
    """Undo a failed import, through qemu-img: remove the bitmap of that name if it is
    there now (nobody else edits a closed image meanwhile: qemu-img's lock keeps QEMU
    out), and put the replaced one back. A failure here is reported, never hidden."""
    try:
        header = qcow2.read_header(image)
        if header.find(name) is not None:
            bitmap(image, name, ["--remove"])
        if old is not None:
            tmp.unlink(missing_ok=True)
            _add_merge(image, size, old, tmp, False)
    except Qcow2Error as e:
        raise QemuImgError(
            f"{cause}; restoring {image} failed too: {e} (check bitmap {name!r} by hand)"
        ) from None


def _sync(image: str) -> None:
    """qemu-img flushed on close; make the file's data and metadata durable here too."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
