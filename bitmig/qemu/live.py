"""Bitmaps of a running QEMU or qemu-storage-daemon, through its QMP socket.

QMP gives no bitmap contents. bitmig has QEMU's own code write them into an image bitmig
owns: a fresh qcow2 file is attached as a temporary node (`bitmig-tmp-...`), the bitmaps
are merged into persistent bitmaps on it, and `blockdev-del` makes QEMU store them in
the file, which bitmig then reads. The user's bitmaps are only ever a merge *source*:
never cleared, disabled, removed or changed.

Consistency while the guest writes: the first read is one QMP `transaction` that both
copies the user's bitmaps and adds a recording bitmap of bitmig's own (`bitmig-rec-...`)
per enabled bitmap, so every write after the copy is caught. Each later delta is again
one transaction: add the next recording bitmap and copy the current one, which is then
removed. Folding a delta into bitmig's copy is an OR (DirtyBitmap.merge_words), which
marks the chunks that changed for the next pass. A reset of the user's bitmap (a backup
job clearing it) is not visible in deltas: `finish` compares QEMU's
x-debug-block-dirty-bitmap-sha256 with bitmig's and reads the bitmap again on a mismatch.

Everything bitmig adds is named with PREFIX and removed by `close`, also after a
failure; `open` removes what an earlier run left behind when its QMP connection was cut.
One bitmig source per QEMU process at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap
from bitmig.qemu.qcow2 import Qcow2Error, bitmap_words, read_bitmaps, write_bitmap_image
from bitmig.qemu.qmp import QMPClient, QMPError

log = logging.getLogger("bitmig.qemu")

PREFIX = "bitmig-"
REC_PREFIX = PREFIX + "rec-"  # recording bitmaps on the user's node
TMP_PREFIX = PREFIX + "tmp-"  # temporary nodes bitmig attaches


class LiveError(Exception):
    """A live-QEMU operation that cannot be done; the message says why."""


@dataclass
class NodeInfo:
    node: str
    size: int
    bitmaps: list[dict[str, Any]]
    read_only: bool = False


async def query_nodes(qmp: QMPClient) -> dict[str, NodeInfo]:
    """Named block nodes with their bitmaps: `query-named-block-nodes` (QEMU and
    qemu-storage-daemon), completed by `query-block` for a QEMU whose format nodes carry
    only generated names."""
    nodes: dict[str, NodeInfo] = {}
    for n in await qmp.execute("query-named-block-nodes", flat=True):
        name = n.get("node-name")
        if not isinstance(name, str):
            continue
        nodes[name] = NodeInfo(name, int(n.get("image", {}).get("virtual-size", 0)),
                               list(n.get("dirty-bitmaps") or []), bool(n.get("ro")))
    try:
        blocks = await qmp.execute("query-block")
    except QMPError:
        blocks = []  # qemu-storage-daemon has no devices
    for b in blocks:
        ins = b.get("inserted") or {}
        name = ins.get("node-name")
        if isinstance(name, str) and name not in nodes:
            nodes[name] = NodeInfo(name, int(ins.get("image", {}).get("virtual-size", 0)),
                                   list(ins.get("dirty-bitmaps") or []), bool(ins.get("ro")))
    return nodes


# -- the source ----------------------------------------------------------------------


@dataclass
class LiveBitmap:
    """One of the user's bitmaps being read, and bitmig's copy of it."""

    node: str
    name: str
    granularity: int
    enabled: bool
    persistent: bool
    disk_size: int
    bitmap: DirtyBitmap | None = None
    rec: str | None = None  # bitmig's recording bitmap catching writes since the last read


@dataclass
class LiveStats:
    full_reads: int = 0
    deltas: int = 0
    bits_folded: int = 0
    rereads: int = 0


class LiveSource:
    """Reads the bitmaps of a running QEMU and keeps bitmig's copies current.

    `await open()`, `await snapshot()` (first consistent copy), then `await poll()` as
    often as wanted (folds deltas in) and `await finish()` once the writer has stopped
    (last delta, sha256 check, full re-read on a mismatch); always `await close()`.
    """

    def __init__(self, qmp_path: str, node: str | None = None,
                 names: Iterable[str] | None = None, workdir: str | None = None,
                 chunk_size: int = defaults.CHUNK_SIZE, timeout: float = 30.0) -> None:
        self.qmp_path = qmp_path
        self.node_filter = node
        self.names = list(names) if names else None
        self.workdir = workdir or tempfile.gettempdir()
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.qmp: QMPClient | None = None
        self.bitmaps: list[LiveBitmap] = []
        self.stats = LiveStats()
        self.run = secrets.token_hex(4)
        self._seq = 0
        self._lock = asyncio.Lock()  # poll, finish and close never interleave

    # -- setup ------------------------------------------------------------------------

    async def open(self) -> list[LiveBitmap]:
        """Connect, remove leftovers of an earlier cut run, and find the bitmaps."""
        self.qmp = await QMPClient.connect(self.qmp_path, timeout=self.timeout)
        await remove_leftovers(self.qmp)
        nodes = await query_nodes(self.qmp)
        if self.node_filter is not None and self.node_filter not in nodes:
            raise LiveError(f"no block node {self.node_filter!r} in QEMU "
                            f"(nodes: {', '.join(sorted(nodes)) or 'none'})")
        found: list[LiveBitmap] = []
        for info in nodes.values():
            if self.node_filter is not None and info.node != self.node_filter:
                continue
            for b in info.bitmaps:
                name = str(b.get("name", ""))
                if name.startswith(PREFIX):
                    continue
                if self.names is not None and name not in self.names:
                    continue
                if b.get("inconsistent"):
                    raise LiveError(f"bitmap {info.node}/{name} is inconsistent in QEMU "
                                    "(QEMU stopped without storing it); refusing to copy it")
                found.append(LiveBitmap(info.node, name, int(b["granularity"]),
                                        bool(b.get("recording", True)),
                                        bool(b.get("persistent", False)), info.size))
        if self.names is not None:
            missing = set(self.names) - {b.name for b in found}
            if missing:
                raise LiveError(f"no bitmap {', '.join(sorted(missing))} in QEMU"
                                + (f" on node {self.node_filter}" if self.node_filter else ""))
        if not found:
            raise LiveError("QEMU has no bitmap to migrate"
                            + (f" on node {self.node_filter}" if self.node_filter else ""))
        self.bitmaps = found
        return found

    def _name(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self.run}-{self._seq}"

    def _by_node(self, items: list[LiveBitmap]) -> dict[str, list[LiveBitmap]]:
        out: dict[str, list[LiveBitmap]] = {}
        for b in items:
            out.setdefault(b.node, []).append(b)
        return out

    # -- reading ----------------------------------------------------------------------

    async def _copy_out(self, node: str, size: int,
                        sources: list[tuple[LiveBitmap, str, str]],
                        extra: list[dict[str, Any]]) -> dict[int, np.ndarray]:
        """In one transaction, run `extra` actions and merge each (bitmap, src node, src
        name) into a temporary image; return its words by index into `sources`."""
        assert self.qmp is not None
        qmp = self.qmp
        tmp = self._name(TMP_PREFIX)
        path = os.path.join(self.workdir, f"{tmp}.qcow2")
        attached = False
        try:
            # A fresh empty image of bitmig's own (D's writer: no qemu-img process).
            await asyncio.to_thread(write_bitmap_image, path, size, [])
            attached = True  # before the call: a cancellation may land after QEMU added it
            await qmp.execute("blockdev-add", driver="qcow2", **{"node-name": tmp},
                              file={"driver": "file", "filename": path})
            actions = list(extra)
            for i, (b, src_node, src_name) in enumerate(sources):
                await qmp.execute("block-dirty-bitmap-add", node=tmp, name=f"c{i}",
                                  granularity=b.granularity, persistent=True)
                actions.append(_act("block-dirty-bitmap-merge", node=tmp, target=f"c{i}",
                                    bitmaps=[{"node": src_node, "name": src_name}]))
            await qmp.execute("transaction", actions=actions)
            await qmp.execute("blockdev-del", **{"node-name": tmp})  # QEMU writes the file
            attached = False
            names = [f"c{i}" for i in range(len(sources))]
            got = await asyncio.to_thread(read_bitmaps, path, names)
        except Qcow2Error as e:
            raise LiveError(f"temporary image {path}: {e}") from None
        finally:
            if attached:
                try:
                    await qmp.execute("blockdev-del", **{"node-name": tmp})
                except QMPError as e:
                    if "not found" not in str(e).lower():
                        log.warning("could not detach %s: %s", tmp, e)
            try:
                os.unlink(path)
            except OSError:
                pass
        out: dict[int, np.ndarray] = {}
        for i, (b, _n, _s) in enumerate(sources):
            ib = got[i]
            if ib.granularity != b.granularity or ib.words.shape != (
                    bitmap_words(b.disk_size, b.granularity),):
                raise LiveError(f"bitmap {b.node}/{b.name}: QEMU wrote an unexpected copy")
            out[i] = ib.words
        return out

    async def snapshot(self) -> None:
        """The first consistent copy of every bitmap, with recording started."""
        async with self._lock:
            for node, items in self._by_node(self.bitmaps).items():
                await self._full_read(node, items, record=True)

    async def _full_read(self, node: str, items: list[LiveBitmap], record: bool) -> None:
        extra: list[dict[str, Any]] = []
        new_rec: dict[int, str] = {}
        for i, b in enumerate(items):
            if record and b.enabled:
                new_rec[i] = self._name(REC_PREFIX)
                extra.append(_act("block-dirty-bitmap-add", node=node, name=new_rec[i],
                                  granularity=b.granularity, persistent=False))
        old = [b.rec for b in items]
        try:
            words = await self._copy_out(node, items[0].disk_size,
                                         [(b, node, b.name) for b in items], extra)
        except BaseException:
            # The transaction may have run before the failure: drop its recorders.
            await self._remove(node, list(new_rec.values()))
            raise
        for i, b in enumerate(items):
            if b.bitmap is None:
                b.bitmap = DirtyBitmap(b.disk_size, b.granularity, self.chunk_size,
                                       words=words[i])
            else:
                b.bitmap.assign_words(words[i])  # in place: the registry holds this one
            if i in new_rec:
                b.rec = new_rec[i]
        await self._remove(node, [r for r in old if r and r not in new_rec.values()])
        self.stats.full_reads += 1

    async def rearm(self) -> list[LiveBitmap]:
        """After a failed migration attempt whose `finish` stopped recording: read the
        enabled bitmaps again, consistently, and start recording again (the guest may
        be writing once more). Returns the bitmaps re-armed."""
        async with self._lock:
            if self.qmp is None:
                await self._reconnect()
            idle = [b for b in self.bitmaps if b.enabled and b.rec is None]
            for node, items in self._by_node(idle).items():
                await self._full_read(node, items, record=True)
            return idle

    @property
    def recording(self) -> bool:
        return all(b.rec is not None for b in self.bitmaps if b.enabled)

    async def poll(self, last: bool = False) -> int:
        """Fold in the writes recorded since the previous read. With `last` (the writer
        has stopped) no new recorder is started. Returns bits that changed."""
        async with self._lock:
            return await self._poll(last)

    async def _poll(self, last: bool) -> int:
        changed = 0
        for node, items in self._by_node([b for b in self.bitmaps if b.rec]).items():
            extra: list[dict[str, Any]] = []
            new_rec: dict[int, str] = {}
            if not last:
                for i, b in enumerate(items):
                    new_rec[i] = self._name(REC_PREFIX)
                    extra.append(_act("block-dirty-bitmap-add", node=node, name=new_rec[i],
                                      granularity=b.granularity, persistent=False))
            try:
                words = await self._copy_out(node, items[0].disk_size,
                                             [(b, node, b.rec or "") for b in items], extra)
            except BaseException:
                await self._remove(node, list(new_rec.values()))
                raise
            old = [b.rec for b in items]
            for i, b in enumerate(items):
                assert b.bitmap is not None
                n = b.bitmap.merge_words(words[i])
                changed += n
                b.rec = new_rec.get(i)
            await self._remove(node, [r for r in old if r])
            self.stats.deltas += 1
        self.stats.bits_folded += changed
        return changed

    async def finish(self) -> list[LiveBitmap]:
        """After the writer stopped: the last delta, then QEMU's sha256 against ours;
        a bitmap that differs (reset or disabled by someone meanwhile) is read again.
        Returns the bitmaps that were read again."""
        async with self._lock:
            try:
                if self.qmp is None:
                    raise QMPError("not connected")
                await self._poll(last=True)
            except QMPError as e:
                # The connection was cut (deltas may be lost): with the writer stopped
                # a full read is consistent, so reconnect and let the check below
                # re-read whatever differs.
                log.warning("QMP connection lost (%s); reconnecting for a full read", e)
                await self._reconnect()
            assert self.qmp is not None
            again: list[LiveBitmap] = []
            for b in self.bitmaps:
                assert b.bitmap is not None
                if await self.qemu_sha256(b.node, b.name) != b.bitmap.sha256().hex():
                    again.append(b)
            for node, items in self._by_node(again).items():
                fresh = await self._copy_out(node, items[0].disk_size,
                                             [(b, node, b.name) for b in items], [])
                for i, b in enumerate(items):
                    assert b.bitmap is not None
                    # In place: the registry's object stays the same, and the meta
                    # bitmap (and every other tracker) marks the chunks that differ.
                    b.bitmap.assign_words(fresh[i])
                    self.stats.rereads += 1
            return again

    async def _reconnect(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        self.qmp = await QMPClient.connect(self.qmp_path, timeout=self.timeout)
        await remove_leftovers(self.qmp)
        for b in self.bitmaps:
            b.rec = None  # removed with the leftovers; no delta can be read any more

    async def disconnect(self) -> None:
        """Drop a broken connection. Recording stops (its bitmaps stay in QEMU until
        the reconnection removes them as leftovers); `rearm` or `finish` reconnects."""
        async with self._lock:
            if self.qmp is not None:
                await self.qmp.close()
                self.qmp = None
            for b in self.bitmaps:
                b.rec = None

    async def qemu_sha256(self, node: str, name: str) -> str:
        assert self.qmp is not None
        r = await self.qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node, name=name)
        return str(r["sha256"])

    # -- cleanup ----------------------------------------------------------------------

    async def _remove(self, node: str, names: list[str]) -> None:
        if not names or self.qmp is None:
            return
        for n in names:
            try:
                await self.qmp.execute("block-dirty-bitmap-remove", node=node, name=n)
            except QMPError as e:
                if "not found" not in str(e).lower():
                    log.warning("could not remove %s/%s: %s", node, n, e)

    async def close(self) -> None:
        """Remove every recording bitmap bitmig added; close the connection."""
        if self.qmp is None:
            return
        try:
            for b in self.bitmaps:
                if b.rec:
                    await self._remove(b.node, [b.rec])
                    b.rec = None
            # A read cut short (cancelled at shutdown) may have left its temporary node.
            for info in (await query_nodes(self.qmp)).values():
                if info.node.startswith(f"{TMP_PREFIX}{self.run}-"):
                    await self.qmp.execute("blockdev-del", **{"node-name": info.node})
        except QMPError as e:  # the connection is gone: the next run removes them
            log.warning("cleanup in QEMU incomplete (%s); the next run removes leftovers", e)
        finally:
            await self.qmp.close()
            self.qmp = None


def _act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


async def remove_leftovers(qmp: QMPClient) -> list[str]:
    """Remove bitmaps and temporary nodes an earlier bitmig run left behind (its QMP
    connection was cut before it could clean up). Returns what was removed."""
    removed: list[str] = []
    nodes = await query_nodes(qmp)
    for info in nodes.values():
        if info.node.startswith(TMP_PREFIX):
            await qmp.execute("blockdev-del", **{"node-name": info.node})
            removed.append(info.node)
            continue
        for b in info.bitmaps:
            name = str(b.get("name", ""))
            if name.startswith(REC_PREFIX):
                await qmp.execute("block-dirty-bitmap-remove", node=info.node, name=name)
                removed.append(f"{info.node}/{name}")
    if removed:
        log.warning("removed leftovers of an earlier bitmig run: %s", ", ".join(removed))
    return removed


