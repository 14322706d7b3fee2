"""The temp files of bitmaps being received or parked, by the handles that the
destination session names them with (host-wide: a parked spool outlives its connection)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import Spool, Store, StoredMeta, StoreError


class Spools:
    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.files: dict[int, Spool] = {}
        self.syncing: dict[int, asyncio.Future[None]] = {}

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
        """Store durably (header + fsync + rename of the spool, or the whole bitmap).
        Returns the meta as stored. Raises StoreError; the temp file is gone either way."""
        meta = dataclasses.replace(meta, stored_at=time.time())
        spool = self.files.pop(handle, None) if handle is not None else None
        if spool is not None:
            try:
                await asyncio.to_thread(spool.commit, meta)
            finally:
                spool.abort()  # after a rename: closes nothing, unlinks nothing
        elif self.store is not None:
            await asyncio.to_thread(self.store.save, meta, bitmap)
        return meta
