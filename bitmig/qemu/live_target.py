"""A destination's delivery target: a running QEMU or qemu-storage-daemon (QMP socket).

The user's node is changed only by QEMU's own code. bitmig writes a fresh qcow2 file of
its own holding the received bitmap (bitmig.qemu.qcow2.write_bitmap_image), attaches it
read-only as a temporary node, and in one QMP transaction adds the bitmap on the user's
node (same name or a mapped one, same granularity, enabled state and persistence) and
merges the temporary copy into it. The temporary node is detached, and QEMU's
x-debug-block-dirty-bitmap-sha256 must equal the received bitmap's before `deliver`
returns, so the acknowledgement (the handoff) comes only once QEMU holds the bitmap.
On any failure what bitmig added is removed again and TargetError raised.

A persistent bitmap lives in QEMU's memory until QEMU closes the image (then QEMU stores
it in the qcow2 file), exactly like a bitmap added by `block-dirty-bitmap-add`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections.abc import Callable

from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol.spec import ErrorCode
from bitmig.qemu.live import PREFIX, TMP_PREFIX, NodeInfo, query_nodes
from bitmig.qemu.qcow2 import (
    ImageBitmap,
    LimitError,
    Qcow2Error,
    check_bitmap_limits,
    write_bitmap_image,
)
from bitmig.qemu.qmp import QMPClient, QMPError
from bitmig.session.target import Incoming, TargetError

log = logging.getLogger("bitmig.qemu")

Mapper = Callable[[str, str], tuple[str, str]]  # (node, name) -> (node, name) in QEMU
MAX_BITMAPS_PER_NODE = 65535  # qcow2's limit on persistent bitmaps of one image


class LiveTarget:
    """Delivers received bitmaps into a running QEMU. See the module docstring."""

    def __init__(self, qmp_path: str, mapper: Mapper | None = None, replace: bool = False,
                 workdir: str | None = None, timeout: float = 30.0) -> None:
        self.qmp_path = qmp_path
        self.mapper = mapper
        self.replace = replace
        self.workdir = workdir or tempfile.gettempdir()
        self.timeout = timeout
        self.description = f"live QEMU (QMP {qmp_path})"
        self._qmp: QMPClient | None = None
        self._lock = asyncio.Lock()  # one delivery at a time: check-then-add stays true

    async def _client(self) -> QMPClient:
        if self._qmp is None:
            try:
                self._qmp = await QMPClient.connect(self.qmp_path, timeout=self.timeout)
            except QMPError as e:
                raise TargetError(ErrorCode.STORAGE, str(e)) from None
        return self._qmp

    async def _drop(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None

    async def close(self) -> None:
        await self._drop()

    def where(self, bitmap: Incoming) -> tuple[str, str]:
        """The node and name the bitmap gets in QEMU."""
        return self.mapper(bitmap.node, bitmap.name) if self.mapper else (bitmap.node,
                                                                           bitmap.name)

    async def _inspect(self, bitmap: Incoming) -> tuple[str, str, NodeInfo, dict | None]:
        node, name = self.where(bitmap)
        if name.startswith(PREFIX):
            raise TargetError(ErrorCode.LIMIT, f"bitmap names starting with {PREFIX!r} are "
                              "bitmig's own in QEMU; map the bitmap to another name")
        try:
            check_bitmap_limits(bitmap.disk_size, bitmap.granularity, name)
        except LimitError as e:
            raise TargetError(ErrorCode.LIMIT, f"bitmap {node}/{name}: {e}") from None
        qmp = await self._client()
        try:
            nodes = await query_nodes(qmp)
        except QMPError as e:
            await self._drop()
            raise TargetError(ErrorCode.STORAGE, str(e)) from None
        info = nodes.get(node)
        if info is None:
            raise TargetError(ErrorCode.STORAGE, f"no block node {node!r} in QEMU "
                              f"(nodes: {', '.join(sorted(nodes)) or 'none'}); "
                              "map the node with --map")
        if info.size != bitmap.disk_size:
            raise TargetError(ErrorCode.LIMIT, f"node {node} is {info.size} bytes, the "
                              f"bitmap covers {bitmap.disk_size} bytes")
        old = next((b for b in info.bitmaps if b.get("name") == name), None)
        if old is not None and not self.replace:
            raise TargetError(ErrorCode.EXISTS, f"bitmap {node}/{name} already exists in "
                              "QEMU (give --replace to replace it)")
        if old is None and len(info.bitmaps) >= MAX_BITMAPS_PER_NODE:
            raise TargetError(ErrorCode.LIMIT, f"node {node} already has "
                              f"{len(info.bitmaps)} bitmaps (qcow2's limit: 65535)")
        if old is not None and old.get("busy"):
            raise TargetError(ErrorCode.EXISTS, f"bitmap {node}/{name} is busy in QEMU "
                              "(a backup job uses it); cannot replace it now")
        return node, name, info, old

    async def check(self, bitmap: Incoming) -> None:
        async with self._lock:
            await self._inspect(bitmap)

    async def deliver(self, bitmap: Incoming, data: DirtyBitmap) -> None:
        async with self._lock:
            node, name, _info, old = await self._inspect(bitmap)
            try:
                await self._deliver(bitmap, data, node, name, old)
            except QMPError as e:
                await self._drop()
                raise TargetError(ErrorCode.STORAGE, f"bitmap {node}/{name}: {e}") from None
            except Qcow2Error as e:
                raise TargetError(ErrorCode.STORAGE, f"bitmap {node}/{name}: {e}") from None

    async def _deliver(self, bitmap: Incoming, data: DirtyBitmap, node: str, name: str,
                       old: dict | None) -> None:
        qmp = await self._client()
        tmp = f"{TMP_PREFIX}{secrets.token_hex(4)}"
        path = os.path.join(self.workdir, f"{tmp}.qcow2")
        src = ImageBitmap("b", bitmap.granularity, False, False, data.words)
        await asyncio.to_thread(write_bitmap_image, path, bitmap.disk_size, [src])
        attached = added = False
        try:
            await qmp.execute("blockdev-add", driver="qcow2", **{"node-name": tmp},
                              **{"read-only": True},
                              file={"driver": "file", "filename": path, "read-only": True})
            attached = True
            merge = _act("block-dirty-bitmap-merge", node=node, target=name,
                         bitmaps=[{"node": tmp, "name": "b"}])
            same = (old is not None and int(old.get("granularity", 0)) == bitmap.granularity
                    and bool(old.get("persistent")) == bitmap.persistent)
            if same:
                # Replace in place, atomically: the old bits never mix with the new.
                flip = "block-dirty-bitmap-enable" if bitmap.enabled else \
                    "block-dirty-bitmap-disable"
                await qmp.execute("transaction", actions=[
                    _act("block-dirty-bitmap-clear", node=node, name=name), merge,
                    _act(flip, node=node, name=name)])
            else:
                if old is not None:  # replace asked, but geometry differs: remove first
                    await qmp.execute("block-dirty-bitmap-remove", node=node, name=name)
                await qmp.execute("transaction", actions=[
                    _act("block-dirty-bitmap-add", node=node, name=name,
                         granularity=bitmap.granularity, persistent=bitmap.persistent,
                         disabled=not bitmap.enabled), merge])
                added = True
            await qmp.execute("blockdev-del", **{"node-name": tmp})
            attached = False
            got = await qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node, name=name)
            want = data.sha256().hex()
            if got.get("sha256") != want:
                # Enabled and the node written meanwhile, or a QEMU fault: not ours to ack.
                raise TargetError(ErrorCode.STORAGE, f"bitmap {node}/{name}: QEMU's sha256 "
                                  f"{got.get('sha256')} differs from the received {want}")
            added = False  # delivered: it is the user's now
        finally:
            if added:
                try:
                    await qmp.execute("block-dirty-bitmap-remove", node=node, name=name)
                except QMPError as e:
                    log.warning("could not remove %s/%s after a failed delivery: %s",
                                node, name, e)
            if attached:
                try:
                    await qmp.execute("blockdev-del", **{"node-name": tmp})
                except QMPError as e:
                    log.warning("could not detach %s: %s", tmp, e)
            try:
                os.unlink(path)
            except OSError:
                pass


def _act(kind: str, **data: object) -> dict[str, object]:
    return {"type": kind, "data": data}
