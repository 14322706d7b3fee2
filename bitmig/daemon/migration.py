"""The asyncio adapter of a SourceSession: sockets, TLS, timers, registry ownership.

Every decision (passes, freeze, handoff, resume, retries) is the session's
(bitmig.session.source); this module opens connections, moves bytes, runs timers and
applies the session's freeze/thaw/handoff actions to the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl as ssl_mod
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bitmig.daemon import tls
from bitmig.daemon.channel import Timeout, peer_name
from bitmig.daemon.registry import Entry, Ownership, Registry
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol import spec
from bitmig.protocol.events import Event
from bitmig.session import source as s
from bitmig.session.source import MigrationOptions, MigrationResult

BitmapOutcome = s.BitmapOutcome  # re-exported: callers import these from here too
__all__ = ["BitmapOutcome", "Migration", "MigrationOptions", "MigrationResult"]

WRITE_BUFFER_HIGH = 4 << 20  # bytes queued in the transport before the sender waits
READ_SIZE = 1 << 20
Progress = Callable[[dict[str, Any]], None]
Hook = Callable[[], Awaitable[None]]
OnAttempt = Callable[[MigrationResult, float | None], None]  # result, seconds to the retry


class Migration:
    """Migrates a set of bitmaps, with the retries the options allow. One-shot."""

    def __init__(self, registry: Registry, entries: list[Entry], host: str, port: int,
                 opts: MigrationOptions | None = None, trace: Trace | None = None,
                 progress: Progress | None = None, ssl: ssl_mod.SSLContext | None = None,
                 before_freeze: list[Hook] | None = None,
                 on_attempt: OnAttempt | None = None) -> None:
        self.registry, self.entries = registry, entries
        self.host, self.port, self.ssl = host, port, ssl
        self.opts = opts or MigrationOptions()
        self.trace = trace or Trace(None, "source")
        self.progress, self.on_attempt = progress, on_attempt
        self.before_freeze = before_freeze if before_freeze is not None else []
        for e in entries:  # one token per bitmap until it is handed off: retries share it
            if e.token is None:
                e.token = os.urandom(spec.TOKEN_BYTES)
        outs = [s.OutgoingBitmap(e.node, e.name, e.bitmap, e.token or b"", e.enabled,
                               e.persistent) for e in entries]
        self._by_out = {id(o): e for o, e in zip(outs, entries, strict=True)}
        self.session = s.SourceSession(
            outs, f"{host}:{port}", self.opts, observer=self._observe,
            explain_early_failure=lambda exc: tls.before_hello(exc, host, port, ssl is not None))
        self.result = self.session.result
        self.writer: asyncio.StreamWriter | None = None
        self._peer = f"{host}:{port}"
        self._events: asyncio.Queue[Callable[[float], list[s.Action]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._final: MigrationResult | None = None

    phase = property(lambda self: self.session.phase)  # for status and metrics
    pass_no = property(lambda self: self.session.pass_no)

    def release(self) -> None:
        """Open the freeze gate (wait_for_complete): freeze at the next chance."""
        self._feed(self.session.open_gate)

    def _observe(self, direction: str, event: Event, nbytes: int) -> None:
        if self.trace.enabled:
            self.trace.frame(direction, self._peer, event, nbytes)

    def _feed(self, fn: Callable[[float], list[s.Action]]) -> None:
        self._events.put_nowait(fn)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _entry(self, bid: int) -> Entry:
        return self._by_out[id(self.session.items[bid].out)]

    async def run(self) -> MigrationResult:
        loop = asyncio.get_running_loop()
        for e in self.entries:
            if e.state is not Ownership.OWNED:
                self.result.error = f"ValueError: bitmap {e.key} is {e.state.value}, not owned"
                return self.result
        for e in self.entries:
            e.state = Ownership.MIGRATING
        try:
            actions = self.session.start(loop.time())
            while True:
                for a in actions:
                    await self._do(a)
                if self._final is not None:
                    return self._final
                actions = (await self._events.get())(loop.time())
        finally:
            if self._final is None:  # cancelled: the session still closes its books
                self.session.abort(loop.time())
            for t in list(self._tasks):
                t.cancel()
            if self._timer:
                self._timer.cancel()
            await self._close()
            for e in self.entries:  # whatever was not acknowledged stays ours, intact
                if e.state is not Ownership.HANDED_OFF:
                    self.registry.thaw(e, None)
            self.trace.flush()

    async def _do(self, a: s.Action) -> None:
        match a:
            case s.Send(buffers=bufs) if self.writer is not None:
                for buf in bufs:  # one write per buffer: no joined copy of payloads
                    self.writer.write(buf)
            case s.WantWrite():
                w = self.writer
                if w is not None and w.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    self._spawn(self._drain(w))
                else:
                    self._feed(self.session.writable)
            case s.SetTimer(at=at):
                self._arm(at)
            case s.Progress(fields=f) if self.progress is not None:
                self.progress(f)
            case s.Note(kind=kind, fields=f):
                self.trace.event(kind, **f)
            case s.Compute(jobs=jobs):
                self._spawn(self._compute(jobs))
            case s.Freeze(ids=ids):
                self._spawn(self._freeze(ids))
            case s.Unfreeze(ids=ids):
                for e in map(self._entry, ids):
                    self.registry.thaw(e, None)  # held mutations apply in arrival order
                    e.state = Ownership.MIGRATING
            case s.HandOff(id=i, owner=owner):
                self.registry.thaw(self._entry(i), owner)
            case s.Connect(at=at):
                self._spawn(self._connect(at))
            case s.Close():
                await self._close()
            case s.AttemptDone(result=r, retry_at=retry_at):
                await self._attempt_done(r, retry_at)
            case s.Finished(result=r):
                self._final = r

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= at:
                return  # an earlier timer fires first; the session re-arms from there
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._feed(self.session.timer)

    async def _drain(self, w: asyncio.StreamWriter) -> None:
        try:
            await w.drain()
        except (OSError, ssl_mod.SSLError):
            return  # the reader reports the broken connection
        if w is self.writer:
            self._feed(self.session.writable)

    async def _compute(self, jobs: list[Callable[[], Any]]) -> None:
        await asyncio.gather(*(asyncio.to_thread(j) for j in jobs))
        self._feed(self.session.computed)

    async def _freeze(self, ids: list[int]) -> None:
        for hook in self.before_freeze:  # e.g. fold QEMU's last delta into the bitmap
            await hook()
        if self.session.step is not s.Step.FREEZING:
            return  # the attempt ended meanwhile
        self.registry.freeze([self._entry(i) for i in ids])
        self._feed(self.session.frozen)

    async def _connect(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, at - loop.time()))
        o = self.opts
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, limit=1 << 20), o.connect_timeout)
        except (OSError, ssl_mod.SSLError, TimeoutError) as e:
            err: Exception = e
            if isinstance(e, TimeoutError):
                err = Timeout(f"timed out after {o.connect_timeout:g}s connecting to "
                              f"{self.host}:{self.port}")
            elif isinstance(e, ssl_mod.SSLError):
                err = tls.before_hello(e, self.host, self.port, True)
            self._feed(lambda now: self.session.connect_failed(now, err))
            return
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.writer = writer
        self._peer = peer_name(writer)
        self._feed(self.session.connected)
        self._spawn(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                self._feed(lambda now, d=data: self.session.receive_data(now, d)
                           if w is self.writer else [])
        except (OSError, ssl_mod.SSLError) as e:
            err = e
            self._feed(lambda now: self.session.connection_lost(now, err)
                       if w is self.writer else [])
            return
        self._feed(lambda now: self.session.eof(now) if w is self.writer else [])

    async def _close(self) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(OSError, TimeoutError, ssl_mod.SSLError):
                await asyncio.wait_for(w.wait_closed(), 2)

    async def _attempt_done(self, r: MigrationResult, retry_at: float | None) -> None:
        # QEMU's flat sha256 of each handed-off bitmap, for reports and cross-checks: not
        # part of the protocol, so computed outside the migration's duration (the bitmap
        # no longer changes once handed off).
        by_key = {(e.node, e.name): e.bitmap for e in self.entries}
        for b in r.bitmaps:
            if b.ok and not b.sha256:
                b.sha256 = (await asyncio.to_thread(by_key[(b.node, b.name)].sha256)).hex()
        self.trace.event("outcome", ok=r.ok, error=r.error, downtime_ms=r.downtime_ms,
                         bytes_sent=r.bytes_sent, passes=r.passes,
                         bitmaps=[asdict(b) for b in r.bitmaps])
        self.trace.flush()
        self.result = r
        if self.on_attempt is not None:
            loop = asyncio.get_running_loop()
            self.on_attempt(r, None if retry_at is None else max(0.0, retry_at - loop.time()))
