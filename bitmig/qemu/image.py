"""A closed qcow2 image as a daemon's bitmap source and as a destination's target, and
the offline export/import between an image and a daemon's store.

Source: the image is only read (bitmig.qemu.qcow2), never opened by QEMU's code, so it
is not changed at all. Destination: each verified bitmap is brought in through qemu-img
(bitmig.qemu.qemu_img.import_bitmap), which leaves the image as it was on failure.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap, GeometryError
from bitmig.core.digest import tree_digest
from bitmig.core.store import Store, StoredMeta
from bitmig.protocol.spec import ErrorCode
from bitmig.qemu import qcow2, qemu_img
from bitmig.qemu.mapping import Mapping
from bitmig.qemu.qcow2 import ImageBitmap, Qcow2Error
from bitmig.session.target import Incoming, TargetError


def default_node(image: str | os.PathLike[str]) -> str:
    """The node name an image's bitmaps get when none is given: the file name without its
    extension (vda.qcow2 -> vda)."""
    return Path(image).stem or Path(image).name


@dataclass(eq=False)
class LoadedBitmap:
    node: str
    image: ImageBitmap
    bitmap: DirtyBitmap


def load_image_bitmaps(
    image: str | os.PathLike[str],
    node: str | None = None,
    names: list[str] | None = None,
    chunk_size: int = defaults.CHUNK_SIZE,
) -> list[LoadedBitmap]:
    """The image's persistent bitmaps (or those named) as DirtyBitmaps of `node`.
    Raises Qcow2Error (in_use, inconsistent, missing, not qcow2): nothing is loaded."""
    header = qcow2.read_header(image)
    node = node or default_node(image)
    out = []
    for ib in qcow2.read_bitmaps(image, names):
        try:
            bm = ib.to_dirty_bitmap(header.virtual_size, chunk_size)
        except GeometryError as e:
            raise qcow2.LimitError(f"{image}: bitmap {ib.name!r}: {e}") from None
        out.append(LoadedBitmap(node, ib, bm))
    return out


def _target_error(e: Exception) -> TargetError:
    if isinstance(e, qemu_img.BitmapExistsError):
        return TargetError(ErrorCode.EXISTS, str(e))
    if isinstance(e, qcow2.LimitError):
        return TargetError(ErrorCode.LIMIT, str(e))
    return TargetError(ErrorCode.STORAGE, str(e))


class ImageTarget:
    """A destination's BitmapTarget: a closed qcow2 image (bitmig.session.target).

    `node`, when set, is the only destination node accepted (after mapping); otherwise
    every node's bitmaps go into this one image. Deliveries into the image are serialized
    (qemu-img takes the image's write lock)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        mapping: Mapping | None = None,
        replace: bool = False,
        node: str | None = None,
    ) -> None:
        self.path = str(path)
        self.mapping = mapping or Mapping()
        self.replace = replace
        self.node = node
        self.description = f"qcow2 image {self.path}"
        self._lock = asyncio.Lock()
        qcow2.read_header(self.path)  # refuse a missing or non-qcow2 image at start

    def dest_name(self, bitmap: Incoming) -> str:
        node, name = self.mapping.map(bitmap.node, bitmap.name)
        if self.node is not None and node != self.node:
            raise TargetError(
                ErrorCode.STORAGE,
                f"{self.description}: unknown node {node!r} (this target holds {self.node!r})",
            )
        return name

    def _check(self, bitmap: Incoming) -> None:
        name = self.dest_name(bitmap)
        try:
            qemu_img.check_import(self.path, name, bitmap.granularity, bitmap.disk_size,
                                  replace=self.replace)
        except Qcow2Error as e:
            raise _target_error(e) from None

    async def check(self, bitmap: Incoming) -> None:
        async with self._lock:
            await asyncio.to_thread(self._check, bitmap)

    def _deliver(self, bitmap: Incoming, data: DirtyBitmap) -> None:
        name = self.dest_name(bitmap)
        ib = ImageBitmap(name, bitmap.granularity, bitmap.enabled, False, data.words)
        try:
            header = qcow2.read_header(self.path)
            old = header.find(name)
            if old is not None and not old.in_use and not self.replace:
                # A retry of a delivery whose ack was lost: the same bitmap is already
                # there, so there is nothing to change.
                have = qcow2.read_bitmaps(self.path, [name])[0]
                if (have.sha256(), have.granularity, have.enabled) == (
                    ib.sha256(), ib.granularity, ib.enabled
                ):
                    return
            qemu_img.import_bitmap(self.path, ib, replace=self.replace)
        except Qcow2Error as e:
            raise _target_error(e) from None

    async def deliver(self, bitmap: Incoming, data: DirtyBitmap) -> None:
        async with self._lock:
            await asyncio.to_thread(self._deliver, bitmap, data)


# -- offline: an image's bitmaps into a store, a store's bitmaps into an image ----------


def export_to_store(
    image: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    node: str | None = None,
    names: list[str] | None = None,
    replace: bool = False,
) -> list[dict[str, object]]:
    """Save the image's bitmaps into a (source's) store; what was saved, per bitmap.
    Refuses (nothing saved) a name already stored unless replace."""
    loaded = load_image_bitmaps(image, node, names)
    store = Store(state_dir, clean=False)
    for lb in loaded:
        if store.exists(lb.node, lb.image.name) and not replace:
            raise qemu_img.BitmapExistsError(
                f"{state_dir}: bitmap {lb.node}/{lb.image.name} already stored (use --replace)"
            )
    out = []
    for lb in loaded:
        bm = lb.bitmap
        meta = StoredMeta(
            node=lb.node, name=lb.image.name, disk_size=bm.disk_size,
            granularity=bm.granularity, chunk_size=bm.chunk_size, enabled=lb.image.enabled,
            persistent=True, count=bm.count(), digest=tree_digest(bm.words.data),
            stored_at=time.time(), origin=f"qcow2:{os.path.abspath(image)}",
        )
        path = store.save(meta, bm)
        out.append(_describe(lb.node, lb.image.name, bm, lb.image.enabled) | {"file": str(path)})
    return out


def _describe(node: str, name: str, bm: DirtyBitmap, enabled: bool) -> dict[str, object]:
    return {"node": node, "name": name, "disk_size": bm.disk_size,
            "granularity": bm.granularity, "enabled": enabled, "count": bm.count(),
            "sha256": bm.sha256().hex()}


def import_from_store(
    state_dir: str | os.PathLike[str],
    image: str | os.PathLike[str],
    mapping: Mapping | None = None,
    replace: bool = False,
    node: str | None = None,
    names: list[str] | None = None,
) -> list[dict[str, object]]:
    """Bring a (destination's) stored bitmaps into the image through qemu-img.

    Every bitmap is checked first (clash, limits, size), so a refusal changes nothing;
    each import is then verified and undone on its own failure."""
    mapping = mapping or Mapping()
    if not (Path(state_dir) / "bitmaps").is_dir():
        raise Qcow2Error(f"{state_dir}: no bitmig state directory (no bitmaps/ inside)")
    store = Store(state_dir, clean=False)
    good, bad = store.load_all()
    if bad:
        raise Qcow2Error(f"{state_dir}: damaged stored bitmap: {bad[0]}")
    chosen = [(m, bm) for m, bm in good
              if (node is None or m.node == node) and (names is None or m.name in names)]
    if names is not None:
        missing = set(names) - {m.name for m, _ in chosen}
        if missing:
            raise qcow2.BitmapNotFoundError(f"{state_dir}: no stored bitmap {sorted(missing)}")
    if not chosen:
        raise qcow2.BitmapNotFoundError(f"{state_dir}: no stored bitmap to import")
    plan = []
    targets: set[str] = set()
    for m, bm in chosen:
        _, dname = mapping.map(m.node, m.name)
        if dname in targets:
            raise qemu_img.BitmapExistsError(
                f"two stored bitmaps map to the name {dname!r} in {image}"
            )
        targets.add(dname)
        qemu_img.check_import(image, dname, m.granularity, m.disk_size, replace=replace)
        plan.append((m, bm, dname))
    out = []
    for m, bm, dname in plan:
        r = qemu_img.import_bitmap(image, ImageBitmap(dname, bm.granularity, m.enabled, False,
                                                      bm.words), replace=replace)
        out.append({"node": m.node, "name": m.name, "image": str(image), "image_name": dname,
                    "granularity": r.granularity, "enabled": r.enabled, "count": r.count,
                    "sha256": r.sha256, "replaced": r.replaced})
    return out


def list_image(image: str | os.PathLike[str]) -> dict[str, object]:
    """What an image holds: size, cluster size, and each bitmap (count and sha256 too,
    unless it is in use)."""
    header = qcow2.read_header(image)
    bitmaps = []
    for e in header.bitmaps:
        d: dict[str, object] = {"name": e.name, "granularity": e.granularity,
                                "enabled": e.enabled, "in_use": e.in_use}
        if not e.in_use:
            ib = qcow2.read_bitmaps(image, [e.name])[0]
            d |= {"count": ib.count(), "sha256": ib.sha256().hex()}
        bitmaps.append(d)
    return {"image": str(image), "virtual_size": header.virtual_size,
            "cluster_size": header.cluster_size, "bitmaps": bitmaps}
