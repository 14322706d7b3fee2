"""The destination side of one connection: rebuild, verify, store durably, then ack."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from bitmig import __version__
from bitmig.core.assembly import Assembly
from bitmig.core.store import Spool, StoredMeta, StoreError
from bitmig.daemon.channel import Channel, Timeout
from bitmig.daemon.registry import Entry
from bitmig.protocol import spec
from bitmig.protocol.errors import PeerError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Ack, Bits, Complete, End, Hello, Mark, Ready, Start, Zeroes
from bitmig.protocol.have import encode_have
from bitmig.protocol.spec import ErrorCode
from bitmig.protocol.state import BitmapState, Role

if TYPE_CHECKING:
    from bitmig.daemon.service import Daemon

log = logging.getLogger("bitmig.dest")

# Bytes spooled to disk between background fsyncs (and leaf-hash refreshes): keeps the
# work left for the frozen window small without syncing every frame.
SYNC_EVERY = 32 << 20


class Receiver:
    """Serves one source connection."""

    def __init__(self, daemon: Daemon, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.daemon = daemon
        self.ch = Channel(reader, writer, Role.DESTINATION, daemon.trace, daemon.io_timeout)
        self.assemblies: dict[int, Assembly] = {}
        self.reserved: dict[int, tuple[str, str]] = {}
        self.spools: dict[int, Spool] = {}
        self.replacing: set[int] = set()
        self.budget: dict[int, int] = {}  # memory budget held per bitmap id
        self.background: dict[int, asyncio.Task[None]] = {}

    async def run(self) -> None:
        ch, d = self.ch, self.daemon
        d.trace.event("connection", peer=ch.peer)
        try:
            await ch.recv("hello", d.connect_timeout)
            await ch.send(Hello(ch.conn.version or spec.PROTOCOL_VERSION,
                                spec.MIN_PROTOCOL_VERSION, Role.DESTINATION,
                                spec.CAPABILITIES, f"bitmig/{__version__}"))
            while True:
                try:
                    ev = await ch.recv("the next frame from the source")
                except PeerError as e:
                    if e.bitmap_id is None:
                        raise
                    self._drop(e.bitmap_id)  # the source aborted that bitmap
                    continue
                except RemoteProtocolError as e:
                    if e.bitmap_id is None or e.code not in spec.BITMAP_ERRORS:
                        raise
                    await self._refuse(e)  # that bitmap fails; the connection goes on
                    continue
                t = type(ev)
                if t is Bits or t is Zeroes:
                    try:
                        self._apply(ev)
                    except RemoteProtocolError as e:
                        if e.bitmap_id is None or e.code not in spec.BITMAP_ERRORS:
                            raise
                        # A payload that does not decode, or a spool write that fails,
                        # fails that bitmap only; the other bitmaps carry on.
                        await self._refuse(e)
                elif t is Start:
                    await self._start(ev)
                elif t is Complete:
                    await self._complete(ev)
                elif t is Mark:
                    # Everything before the mark is applied: echo it, so the source can
                    # measure real throughput; then flush and rehash in the background, so
                    # a frozen window that may follow has little left to do.
                    await ch.send(Mark(ev.seq))
                    await self._flush_all()
                elif t is End:
                    await ch.send(End())
                    break
            d.trace.event("outcome", peer=ch.peer, ok=True)
        except ProtocolError as e:
            log.warning("%s: %s", ch.peer, e)
            d.count_error(e.code)
            d.trace.event("error", peer=ch.peer, code=str(e.code), message=e.message)
            await ch.fail(e)
        except Timeout as e:
            log.warning("%s: %s", ch.peer, e)
            d.count_error(ErrorCode.TIMEOUT)
            d.trace.event("error", peer=ch.peer, code="timeout", message=str(e))
            await ch.fail(RemoteProtocolError(ErrorCode.TIMEOUT, str(e)))
        except (PeerError, OSError) as e:
            log.warning("%s: %s", ch.peer, e)
            d.trace.event("error", peer=ch.peer, code="peer", message=str(e))
        finally:
            for bid in set(self.assemblies) | set(self.reserved) | set(self.spools) | set(
                    self.budget):
                self._park_or_drop(bid)
            await ch.close()
            d.trace.flush()

    def _park_or_drop(self, bid: int) -> None:
        """At the end of the connection: a bitmap cut off mid-stream is kept for a retry
        (it has a token and was not failed on purpose); anything else is dropped."""
        asm = self.assemblies.get(bid)
        state = self.ch.conn.bitmap_state(bid)
        if (asm is None or asm.start.token is None or bid in self.replacing
                or state not in (BitmapState.STREAMING, BitmapState.COMPLETING)):
            self._drop(bid)
            return
        self.background.pop(bid, None)  # a sync still running finishes before any abort:
        spool = self.spools.pop(bid, None)  # the daemon closes the spool only on expiry
        self.assemblies.pop(bid)
        self.reserved.pop(bid, None)  # the name stays reserved by the parked bitmap
        self.daemon.park(asm.start, asm, spool, self.budget.pop(bid, 0))

    def _drop(self, bid: int) -> None:
        """Forget a bitmap that will not complete: nothing of it was stored."""
        self.assemblies.pop(bid, None)
        self.daemon.release_budget(self.budget.pop(bid, 0))
        task = self.background.pop(bid, None)
        spool = self.spools.pop(bid, None)
        if spool is not None:
            if task is not None and not task.done():
                task.add_done_callback(lambda _t: spool.abort())
            else:
                spool.abort()
        key = self.reserved.pop(bid, None)
        if key is not None:
            self.daemon.reserved.discard(key)

    async def _refuse(self, exc: RemoteProtocolError) -> None:
        self.daemon.count_error(exc.code)
        self.daemon.trace.event("bitmap_error", peer=self.ch.peer, id=exc.bitmap_id,
                                code=str(exc.code), message=exc.message)
        self._drop(exc.bitmap_id)
        self.ch.writer.writelines(self.ch.conn.error_frame(exc))
        await self.ch.drain()

    async def _start(self, ev: Start) -> None:
        d = self.daemon
        key = (ev.node, ev.name)
        size = self.ch.conn.bitmaps[ev.id].serialized_size
        parked = d.claim(ev)  # also discards a parked bitmap this start does not resume
        if ev.token is not None:
            if parked is not None:  # a retry: carry on from what arrived last time
                self.assemblies[ev.id] = parked.assembly
                if parked.spool is not None:
                    self.spools[ev.id] = parked.spool
                self.reserved[ev.id] = key
                await self._ready(ev.id, parked.assembly)
                return
            old = d.replaceable(ev)
            if old is not None:
                await self._restart_from(ev, old, size)
                return
        if d.holds(ev.node, ev.name):
            await self._refuse(RemoteProtocolError(
                ErrorCode.EXISTS, f"bitmap {ev.node}/{ev.name} already exists on the "
                                  "destination", ev.id))
            return
        if not await self._reserve(ev, size):
            return
        try:
            self.assemblies[ev.id] = await asyncio.to_thread(Assembly, ev)
            if d.store is not None:
                self.spools[ev.id] = d.store.begin(ev.node, ev.name, size)
        except (ValueError, MemoryError, OSError) as e:
            await self._refuse(RemoteProtocolError(ErrorCode.LIMIT, f"cannot allocate the "
                                                   f"bitmap: {e}", ev.id))
            return
        except StoreError as e:
            await self._refuse(RemoteProtocolError(ErrorCode.STORAGE, str(e), ev.id))
            return
        await self.ch.send(Ready(ev.id))

    async def _reserve(self, ev: Start, size: int) -> bool:
        """Take the memory budget and the name for a bitmap, or refuse it with `limit`."""
        d = self.daemon
        if not d.take_budget(size):
            await self._refuse(RemoteProtocolError(
                ErrorCode.LIMIT, f"bitmap of {size} bytes exceeds the destination's free "
                                 f"memory budget", ev.id))
            return False
        self.budget[ev.id] = size
        d.reserved.add((ev.node, ev.name))
        self.reserved[ev.id] = (ev.node, ev.name)
        return True

    async def _ready(self, bid: int, asm: Assembly) -> None:
        have = encode_have(asm.received)
        if have is None:  # too many chunks to list in one frame: start over
            asm.received[:] = False
            await self.ch.send(Ready(bid))
            return
        self.daemon.trace.event("resume", id=bid, held_chunks=int(asm.received.sum()))
        await self.ch.send(Ready(bid, have[1], have[0]))

    async def _restart_from(self, ev: Start, old: Entry, size: int) -> None:
        """The ack of an earlier attempt was lost: rebuild from the stored copy, so the
        source need only send what changed since, and replace it at completion."""
        d = self.daemon
        if not await self._reserve(ev, size):
            return
        self.replacing.add(ev.id)

        def build() -> tuple[Assembly, Spool | None]:  # up to 4 GiB: off the event loop
            asm = Assembly(ev)
            asm.bitmap.deserialize(0, asm.bitmap.nchunks, old.bitmap.words)
            asm.received[:] = True
            if d.store is None:
                return asm, None
            spool = d.store.begin(ev.node, ev.name, size)
            try:
                spool.write(0, memoryview(asm.bitmap.words).cast("B"))
            except StoreError:
                spool.abort()
                raise
            return asm, spool

        try:
            asm, spool = await asyncio.to_thread(build)
        except StoreError as e:
            await self._refuse(RemoteProtocolError(ErrorCode.STORAGE, str(e), ev.id))
            return
        except (ValueError, MemoryError, OSError) as e:
            await self._refuse(RemoteProtocolError(ErrorCode.LIMIT, f"cannot allocate the "
                                                   f"bitmap: {e}", ev.id))
            return
        self.assemblies[ev.id] = asm
        if spool is not None:
            self.spools[ev.id] = spool
        await self._ready(ev.id, asm)

    def _apply(self, ev: Bits | Zeroes) -> None:
        asm = self.assemblies.get(ev.id)
        if asm is None:
            return  # in flight when this side failed the bitmap: discarded
        spool = self.spools.get(ev.id)
        if spool is not None and type(ev) is Zeroes and not asm.received[
                ev.first : ev.first + ev.count].any():
            spool = None  # the spool file starts as zeroes: nothing to write
        asm.apply(ev)
        bm = asm.bitmap
        # Rehash the blocks just written, here and now: in a worker thread the hashing
        # loop fights this thread for the GIL and slowed the stream 3x.
        asm.digests.refresh(ev.first * bm.chunk_words, (ev.first + ev.count) * bm.chunk_words)
        if spool is None:
            return
        try:
            spool.write(ev.first * bm.chunk_size, bm.serialize(ev.first, ev.count))
        except StoreError as e:
            raise RemoteProtocolError(ErrorCode.STORAGE, str(e), ev.id) from None
        if spool.unsynced >= SYNC_EVERY:
            self._spawn_sync(ev.id)

    async def _flush_all(self) -> None:
        """Start an fsync of every spool in the background (it releases the GIL)."""
        for bid in list(self.assemblies):
            try:
                self._spawn_sync(bid)
            except RemoteProtocolError as e:
                await self._refuse(e)

    def _spawn_sync(self, bid: int) -> None:
        """fsync a bitmap's spool in a worker thread, unless one is still running. A sync
        that failed is reported now: the kernel reports a writeback error only once, so a
        later fsync could succeed over lost pages."""
        spool = self.spools.get(bid)
        task = self.background.get(bid)
        if spool is None or (task is not None and not task.done()):
            return
        if task is not None and task.exception() is not None:
            raise RemoteProtocolError(ErrorCode.STORAGE, str(task.exception()), bid)
        self.background[bid] = asyncio.create_task(asyncio.to_thread(spool.sync))
    async def _complete(self, ev: Complete) -> None:
        asm = self.assemblies.get(ev.id)
        if asm is None:
            return
        task = self.background.pop(ev.id, None)
        if task is not None:
            try:
                await task
            except StoreError as e:
                await self._refuse(RemoteProtocolError(ErrorCode.STORAGE, str(e), ev.id))
                return
        t0 = time.monotonic()
        try:
            digest = asm.verify(ev)
        except RemoteProtocolError as e:
            await self._refuse(e)
            return
        s = asm.start
        if ev.id in self.replacing and self.daemon.replaceable(s) is None:
            # The copy being replaced changed here while the retry streamed: keep it.
            await self._refuse(RemoteProtocolError(
                ErrorCode.EXISTS, f"bitmap {s.node}/{s.name} changed on the destination "
                                  "since it arrived; not replaced", ev.id))
            return
        meta = StoredMeta(s.node, s.name, s.disk_size, s.granularity, s.chunk_size, s.enabled,
                          s.persistent, asm.bitmap.count(), digest, time.time(), self.ch.peer,
                          s.token or b"")
        t1 = time.monotonic()
        try:
            await self.daemon.commit(meta, asm.bitmap, self.spools.pop(ev.id, None),
                                     replace=ev.id in self.replacing)
        except StoreError as e:
            await self._refuse(RemoteProtocolError(ErrorCode.STORAGE, str(e), ev.id))
            return
        self.assemblies.pop(ev.id)
        asm.bitmap.remove_tracker(asm.digests.stale)  # the owned bitmap needs no leaf hashes
        self.reserved.pop(ev.id, None)
        self.daemon.reserved.discard((s.node, s.name))
        self.daemon.release_budget(self.budget.pop(ev.id, 0))
        if self.ch.conn.bitmap_state(ev.id) is BitmapState.COMPLETING:
            await self.ch.send(Ack(ev.id, digest))
            self.daemon.trace.event("stored", bitmap=f"{s.node}/{s.name}", digest=digest.hex(),
                                    count=asm.bitmap.count(), verify_ms=(t1 - t0) * 1000,
                                    store_ms=(time.monotonic() - t1) * 1000)
