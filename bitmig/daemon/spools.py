"""The temp files of bitmaps being received or parked, by the handles that the
destination session names them with (host-wide: a parked spool outlives its connection)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import Spool, Store, StoredMeta, StoreError, commit_batch

# Bitmaps committed together at most (each holds a descriptor until its batch ends).
MAX_BATCH = 256
# Concurrent data flushes in one batch: enough for the filesystem to merge them into few
# journal commits, few enough not to flood a small machine with threads.
FLUSH_THREADS = 16


class Spools:
    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.files: dict[int, Spool] = {}
        self.syncing: dict[int, asyncio.Future[None]] = {}
        self.due: list[_Due] = []  # commits waiting for the next batch
        self.committer: asyncio.Task[None] | None = None

    def open_descriptors(self) -> int:
        return sum(1 for s in self.files.values() if s.fd >= 0)

    def open(self, handle: int, node: str, name: str, size: int,
             initial: memoryview | None) -> None:
        """Create the temp file (and write `initial`). Raises StoreError. Thread-safe."""
        if self.store is None:
            raise StoreError("no state directory")
        spool = self.store.begin(node, name, size)
        if initial is not None:
            try:
                spool.write(0, initial)
            except StoreError:
                spool.abort()
                raise
        self.files[handle] = spool

    def reopen(self, handle: int) -> None:
        spool = self.files.get(handle)
        if spool is None:
            raise StoreError(f"spool {handle} is gone")
        spool.reopen()

    def write(self, handle: int, offset: int, data: memoryview) -> None:
        self.files[handle].write(offset, data)

    async def sync(self, handle: int) -> None:
        """fdatasync in a worker thread (it releases the GIL)."""
        spool = self.files.get(handle)
        if spool is None:
            return
        fut = asyncio.ensure_future(asyncio.to_thread(spool.sync))
        self.syncing[handle] = fut
        try:
            await fut
        finally:
            if self.syncing.get(handle) is fut:
                del self.syncing[handle]

    def _after_sync(self, handle: int, fn) -> None:
        """Run fn now, or once the sync that runs on this spool ended."""
        fut = self.syncing.pop(handle, None)
        if fut is not None and not fut.done():
            fut.add_done_callback(lambda _f: fn())
        else:
            fn()

    def close(self, handle: int) -> None:
        """Parking: no descriptor held, the temp file stays."""
        spool = self.files.get(handle)
        if spool is not None:
            self._after_sync(handle, spool.close)

    def discard(self, handle: int) -> None:
        spool = self.files.pop(handle, None)
        if spool is not None:
            self._after_sync(handle, spool.abort)

    async def commit(self, handle: int | None, meta: StoredMeta,
                     bitmap: DirtyBitmap) -> StoredMeta:
        """Store durably (header + fdatasync + rename of the spool, or the whole bitmap)
        together with the other commits due now (see _drain). Returns the meta as
        stored. Raises StoreError; the temp file is gone either way."""
        meta = dataclasses.replace(meta, stored_at=time.time())
        spool = self.files.pop(handle, None) if handle is not None else None
        if spool is None and self.store is None:
            return meta  # nothing to store in (a daemon without a state directory)
        fut: asyncio.Future[Path | StoreError] = asyncio.get_running_loop().create_future()
        self.due.append(_Due(spool, meta, bitmap, fut))
        if self.committer is None or self.committer.done():
            self.committer = asyncio.create_task(self._drain())
        out = await fut
        if isinstance(out, StoreError):
            raise out
        return meta

    async def _drain(self) -> None:
        """The group commit: take every commit due, store them as one batch in a worker
        thread, answer each; commits that come due meanwhile form the next batch. One
        batch at a time: while one syncs, the next gathers, so a burst of completions
        pays a few directory fsyncs, not one per bitmap."""
        while self.due:
            batch, self.due = self.due[:MAX_BATCH], self.due[MAX_BATCH:]
            try:
                outs = await asyncio.to_thread(self._commit_batch, batch)
            except BaseException as e:  # a bug or shutdown: no waiter waits forever
                stranded, self.due = batch + self.due, []
                for d in stranded:
                    if d.done.done():
                        continue
                    if isinstance(e, asyncio.CancelledError):
                        d.done.cancel()
                    else:
                        d.done.set_exception(e)
                raise
            for d, out in zip(batch, outs, strict=True):
                if not d.done.done():
                    d.done.set_result(out)

    def _commit_batch(self, batch: list[_Due]) -> list[Path | StoreError]:
        """In a worker thread: spools for whole bitmaps, then commit_batch with the data
        flushes run concurrently (ext4's journal merges concurrent fsyncs)."""
        items: list[tuple[Spool, StoredMeta]] = []
        slot: list[int] = []
        outs: list[Path | StoreError | None] = [None] * len(batch)
        for k, d in enumerate(batch):
            spool = d.spool
            if spool is None:
                assert self.store is not None
                try:
                    spool = self.store.begin(d.meta.node, d.meta.name,
                                             d.bitmap.serialized_size)
                    try:
                        spool.write(0, memoryview(d.bitmap.words).cast("B"))
                    except StoreError:
                        spool.abort()
                        raise
                except StoreError as e:
                    outs[k] = e
                    continue
            items.append((spool, d.meta))
            slot.append(k)
        if items:
            store = items[0][0].store
            done = (commit_batch(store, items, _flush_pool().map) if len(items) > 1 else
                    commit_batch(store, items))
            for k, out in zip(slot, done, strict=True):
                outs[k] = out
        return [o if o is not None else StoreError("not committed") for o in outs]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _flush_pool() -> ThreadPoolExecutor:
    """One pool per process for the flushes of every group commit (its threads start on
    demand and are reused: starting 16 threads per batch cost ~5 ms on a busy machine)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="bitmig-flush")
        return _pool


@dataclasses.dataclass
class _Due:
    """A commit waiting for its batch."""

    spool: Spool | None  # None: write the whole bitmap to a new file
    meta: StoredMeta
    bitmap: DirtyBitmap
    done: asyncio.Future[Path | StoreError]
