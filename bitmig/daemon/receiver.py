"""The destination side of one connection: an asyncio adapter around DestinationSession.

It reads frames, gives their events to the session, and carries out the actions it gets
back (frames, files, threads, the target); completions go back to the session as events.
Every decision is the session's (bitmig.session.destination).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import StoredMeta, StoreError
from bitmig.daemon.channel import Channel, Timeout
from bitmig.daemon.spools import Spools
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.errors import PeerError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Ack, Error
from bitmig.protocol.spec import ErrorCode, Role
from bitmig.protocol.state import BitmapState, ConnState
from bitmig.session import destination as ds
from bitmig.session.target import BitmapTarget, TargetError

log = logging.getLogger("bitmig.dest")
CUT = frozenset({ErrorCode.CLOSED, ErrorCode.TRUNCATED})  # the stream ended: not a violation


@dataclass
class Host:
    """What a receiver may use of its daemon: narrow parts and callbacks."""

    intake: ds.Intake
    stored: ds.StoredBitmaps
    spools: Spools
    own: Callable[[StoredMeta, DirtyBitmap, bool], None]  # adopt a received bitmap
    unstore: Callable[[str, str], None]  # remove a stored copy the target refused
    parked: Callable[[], None]  # bitmaps were parked: (re)arm the expiry timer
    count_error: Callable[[str], None]
    trace: Trace
    target: BitmapTarget | None
    io_timeout: float
    connect_timeout: float


class Receiver:
    """Serves one source connection."""

    def __init__(self, host: Host, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.host = host
        self.ch = Channel(reader, writer, Role.DESTINATION, host.trace, host.io_timeout)
        self.session = ds.DestinationSession(host.intake, host.stored, self.ch.peer,
                                             target=host.target is not None)
        self.ch.landing = self.session.landing  # raw payloads land in the bitmap
        self.tasks: set[asyncio.Task[None]] = set()  # background syncs and what follows
        # Spool writes run in one worker thread, in order (pwrite releases the GIL, so
        # they overlap with receiving the next frames; the bytes are views of the
        # bitmap, nothing is copied to queue them); whatever syncs, commits, closes,
        # reopens or discards a spool first waits for the writes queued before it.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="spool-write")
        self._queued: deque[ds.WriteRange] = deque()
        self._job: asyncio.Future[list[tuple[ds.WriteRange, Exception]]] | None = None

    async def run(self) -> None:
        ch, h, s = self.ch, self.host, self.session
        h.trace.event("connection", peer=ch.peer)
        cut = True
        try:
            while not s.finished:
                try:
                    ev = await ch.recv("the next frame from the source" if s.greeted else
                                       "hello", None if s.greeted else h.connect_timeout)
                except PeerError as e:
                    if e.bitmap_id is None:
                        raise
                    ev = Error(e.code, e.message, e.bitmap_id)  # the source aborted one
                acts = s.handle(ev, time.monotonic())
                if len(acts) == 1 and type(acts[0]) is ds.WriteRange:  # the hot path
                    self._write(acts[0])
                elif acts:
                    await self._do(acts)
            h.trace.event("outcome", peer=ch.peer, ok=True)
        except (ProtocolError, Timeout) as e:
            err = e if isinstance(e, ProtocolError) else RemoteProtocolError(
                ErrorCode.TIMEOUT, str(e))
            cut = type(e) is Timeout or err.code in CUT  # else a violation found here
            log.warning("%s: %s", ch.peer, e)
            h.count_error(err.code)
            h.trace.event("error", peer=ch.peer, code=str(err.code), message=err.message)
            await ch.fail(err)
        except (PeerError, OSError) as e:
            log.warning("%s: %s", ch.peer, e)
            h.trace.event("error", peer=ch.peer, code="peer", message=str(e))
        finally:
            await self._flushed()
            while self.tasks:  # a sync (and the commit it may lead to) ends first
                await asyncio.wait(set(self.tasks))
            await self._do(s.close(time.monotonic(), cut))
            h.parked()
            await ch.close()
            self._writer.shutdown(wait=False)  # nothing is queued any more
            h.trace.flush()

    def _write(self, a: ds.WriteRange) -> None:
        self._queued.append(a)
        if self._job is None:
            self._start_writes()

    def _start_writes(self) -> None:
        job = asyncio.get_running_loop().run_in_executor(self._writer, self._run_writes)
        job.add_done_callback(self._writes_done)
        self._job = job

    def _run_writes(self) -> list[tuple[ds.WriteRange, Exception]]:
        """In the worker thread: every queued write, in order, one hand-off for all."""
        failed = []
        while self._queued:
            a = self._queued.popleft()
            try:
                self.host.spools.write(a.spool, a.offset, a.data)
            except Exception as e:  # reported on the loop's side
                failed.append((a, e))
        return failed

    def _writes_done(self, job: asyncio.Future[list[tuple[ds.WriteRange, Exception]]]) -> None:
        self._job = None
        failed = [] if job.cancelled() or job.exception() else job.result()
        for a, e in failed:
            if isinstance(e, StoreError):
                self._later(self._do(self.session.handle(ds.StoreFailed(a.id, str(e)),
                                                         time.monotonic())))
            else:
                log.error("%s: spool write failed: %r", self.ch.peer, e)
        if self._queued:  # queued after the worker looked for the last time
            self._start_writes()

    async def _flushed(self) -> None:
        """Wait until every write queued so far is done (their errors reported by
        _writes_done)."""
        while self._job is not None:
            await asyncio.wait({self._job})

    def _later(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _do(self, actions: list[ds.Action]) -> None:
        """Carry out actions in order; feed each completion back to the session."""
        h, ch, sp = self.host, self.ch, self.host.spools
        sent = False
        for a in actions:
            t, done = type(a), None
            if t is ds.WriteRange:
                self._write(a)
            elif t is ds.Send:
                if ch.conn.state is ConnState.FAILED or (type(a.event) is Ack and ch.conn.
                                                         bitmap_state(a.event.id) is not
                                                         BitmapState.COMPLETING):
                    continue  # the source failed the connection (read in the same
                    # batch) or aborted the bitmap (owned here then, not acked)
                ch.write(a.event)
                sent = True
            elif t is ds.Refuse:
                h.count_error(a.code)
                h.trace.event("bitmap_error", peer=ch.peer, id=a.id, code=str(a.code),
                              message=a.message)
                ch.writer.writelines(ch.conn.error_frame(
                    RemoteProtocolError(a.code, a.message, a.id)))
                sent = True
            elif t is ds.Sync:
                self._later(self._sync(a))
            elif t is ds.Allocate:
                try:
                    done = ds.Allocated(a.id, await asyncio.to_thread(
                        Assembly.replacing, a.start, a.base))
                except (ValueError, MemoryError) as e:
                    done = ds.AllocFailed(a.id, str(e))
            elif t is ds.OpenSpool or t is ds.ReopenSpool:
                await self._flushed()
                try:
                    if t is ds.OpenSpool:
                        await asyncio.to_thread(sp.open, a.spool, a.node, a.name, a.size,
                                                a.initial)
                    else:
                        sp.reopen(a.spool)
                    done = ds.SpoolOpened(a.id)
                except StoreError as e:
                    done = ds.StoreFailed(a.id, str(e))
            elif t is ds.CloseSpool:
                await self._flushed()
                sp.close(a.spool)
            elif t is ds.DiscardSpool:
                await self._flushed()
                sp.discard(a.spool)
            elif t is ds.Commit:
                # In the background: the next frames (the other bitmaps' completes) are
                # read meanwhile, so their commits join the same group commit.
                self._later(self._commit(a))
            elif t is ds.Check or t is ds.Deliver:
                try:
                    await (h.target.check(a.bitmap) if t is ds.Check else
                           h.target.deliver(a.bitmap, a.data))
                    done = ds.TargetOk(a.id)
                except TargetError as e:
                    done = ds.TargetRefused(a.id, ErrorCode(e.code), e.message)
            elif t is ds.Own:
                h.own(a.meta, a.bitmap, a.replace)
            elif t is ds.Unstore:
                h.unstore(a.node, a.name)
            elif t is ds.Note:
                h.trace.event(a.what, **a.fields)
            if done is not None:
                await self._do(self.session.handle(done, time.monotonic()))
        if sent:
            await ch.drain()

    async def _sync(self, a: ds.Sync) -> None:
        err = None
        await self._flushed()
        try:
            await self.host.spools.sync(a.spool)
        except StoreError as e:
            err = str(e)
        await self._answer(ds.Synced(a.id, err))

    async def _commit(self, a: ds.Commit) -> None:
        done: ds.Stored | ds.StoreFailed
        await self._flushed()  # the bitmap's last writes are in the file first
        try:
            done = ds.Stored(a.id, await self.host.spools.commit(a.spool, a.meta, a.bitmap))
        except StoreError as e:
            done = ds.StoreFailed(a.id, str(e))
        await self._answer(done)

    async def _answer(self, done: ds.Completion) -> None:
        """Give a background completion to the session and carry out what follows."""
        try:
            await self._do(self.session.handle(done, time.monotonic()))
        except (OSError, ProtocolError, Timeout) as e:  # the connection failed meanwhile
            log.warning("%s: %s", self.ch.peer, e)

