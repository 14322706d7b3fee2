"""The source side of a migration: bulk pass, dirty passes, frozen completion, handoff."""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_mod
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bitmig import __version__
from bitmig.core import defaults
from bitmig.core.digest import DigestCache
from bitmig.core.planner import Planner
from bitmig.daemon import tls
from bitmig.daemon.channel import Channel, Timeout
from bitmig.daemon.registry import Entry, Ownership, Registry
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol import spec
from bitmig.protocol.errors import PeerError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Ack, Complete, End, Error, Hello, Mark, Ready, Start, Zeroes
from bitmig.protocol.have import decode_have
from bitmig.protocol.spec import ErrorCode
from bitmig.protocol.state import Role

WRITE_BUFFER_HIGH = 4 << 20  # bytes queued in the transport before the sender waits


@dataclass
class MigrationOptions:
    downtime_ms: float = defaults.DOWNTIME_MS
    max_passes: int = defaults.MAX_PASSES
    small_threshold: int = defaults.SMALL_THRESHOLD
    frame_payload: int = defaults.FRAME_PAYLOAD
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    io_timeout: float = defaults.IO_TIMEOUT
    ack_timeout: float = defaults.ACK_TIMEOUT


@dataclass
class BitmapOutcome:
    node: str
    name: str
    ok: bool
    live: bool
    error: str | None = None
    count: int = 0
    digest: str = ""  # tree digest sent in complete (hex)
    sha256: str = ""  # QEMU-compatible flat sha256 of the handed-off bitmap (hex)
    serialized_size: int = 0
    resumed_chunks: int = 0  # chunks the destination already held from an earlier attempt


@dataclass
class MigrationResult:
    ok: bool
    destination: str
    bitmaps: list[BitmapOutcome] = field(default_factory=list)
    passes: int = 0
    forced: bool = False  # completion forced by max_passes
    bytes_sent: int = 0
    bytes_live: int = 0  # bytes sent before the freeze
    frames: dict[str, int] = field(default_factory=dict)  # every frame sent, by kind
    zero_runs: int = 0
    chunks_sent: int = 0
    downtime_ms: float = 0.0
    duration_s: float = 0.0
    bitmap_bytes: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[dict[str, Any]], None]


class _Item:
    """One bitmap in a migration."""

    def __init__(self, entry: Entry, bid: int, opts: MigrationOptions) -> None:
        self.entry = entry
        self.id = bid
        self.planner = Planner(entry.bitmap, bid, opts.frame_payload)
        self.live = entry.bitmap.serialized_size > opts.small_threshold
        self.digests = DigestCache(entry.bitmap)
        self.outcome = BitmapOutcome(entry.node, entry.name, False, self.live,
                                     serialized_size=entry.bitmap.serialized_size)
        self.active = True
        self.resumed = False
        # Chunks the destination may hold an older version of: sent before (in this attempt
        # or, per `have`, an earlier one) and sent again since the destination last
        # confirmed it applied everything (a mark echo). If the attempt fails they count as
        # dirty again: `have` says the destination holds the chunk, not which version. A
        # chunk sent only once needs no such care: if that frame was lost, `have` lacks it.
        self.sent = np.zeros(entry.bitmap.nchunks, dtype=bool)
        self.unconfirmed = np.zeros(entry.bitmap.nchunks, dtype=bool)
        if entry.token is None:  # one token per bitmap until it is handed off: retries share it
            entry.token = os.urandom(spec.TOKEN_BYTES)


class Migration:
    """Migrates a set of bitmaps over one connection. One-shot: create one per attempt."""

    def __init__(
        self,
        registry: Registry,
        entries: list[Entry],
        host: str,
        port: int,
        opts: MigrationOptions | None = None,
        trace: Trace | None = None,
        progress: Progress | None = None,
        ssl: ssl_mod.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.opts = opts or MigrationOptions()
        self.host, self.port = host, port
        self.trace = trace or Trace(None, "source")
        self.progress = progress
        self.ssl = ssl
        self.items = [_Item(e, i, self.opts) for i, e in enumerate(entries)]
        self.result = MigrationResult(False, f"{host}:{port}",
                                      bitmap_bytes=sum(e.bitmap.serialized_size for e in entries))
        self.phase = "setup"
        self.pass_no = 0
        self._t0 = 0.0
        self._seq = 0
        self._sync_t = 0.0
        self._sync_bytes = 0

    # -- bookkeeping ------------------------------------------------------------------

    def _set_phase(self, phase: str, **extra: Any) -> None:
        self.phase = phase
        self.trace.event("phase", phase=phase, **extra)
        self._report()

    def _report(self, **extra: Any) -> None:
        if self.progress is None:
            return
        self.progress({
            "phase": self.phase, "pass": self.pass_no,
            "bytes_sent": self.ch.conn.bytes_sent if hasattr(self, "ch") else 0,
            "pending_bytes": self._pending(),
            "elapsed_s": time.monotonic() - self._t0, **extra,
        })

    def _pending(self) -> int:
        return sum(it.planner.pending_bytes() for it in self.items if it.active and it.live)

    def _write(self, frames: list[Any]) -> None:
        for f in frames:
            it = self.items[f.id]
            span = slice(f.first, f.first + f.count)
            it.unconfirmed[span] |= it.sent[span]
            it.sent[span] = True
            self.ch.write(f)
            self.result.chunks_sent += f.count
            if type(f) is Zeroes:
                self.result.zero_runs += 1

    async def _drain_if_needed(self) -> None:
        if self.ch.writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.ch.drain("the destination to take more data")

    async def _sync(self) -> float:
        """Send a mark and wait for its echo: the destination has then applied everything
        sent so far. Returns the bytes per second achieved since the previous sync,
        end to end (bytes merely queued in socket buffers do not count as sent)."""
        self._seq += 1
        self.ch.write(Mark(self._seq))
        await self.ch.drain()
        while True:
            try:
                ev = await self.ch.recv("the destination to catch up (mark echo)")
            except PeerError as e:
                it = next((i for i in self.items if i.id == e.bitmap_id and i.active), None)
                if it is None:
                    raise
                self._fail_item(it, f"{e.code}: {e.message}")
                continue
            if type(ev) is Mark and ev.seq == self._seq:
                break
        for it in self.items:
            it.unconfirmed[:] = False
        now, sent = time.monotonic(), self.ch.conn.bytes_sent
        bw = (sent - self._sync_bytes) / max(now - self._sync_t, 1e-6)
        self._sync_t, self._sync_bytes = now, sent
        return bw

    # -- the phases ---------------------------------------------------------------------

    async def run(self) -> MigrationResult:
        self._t0 = time.monotonic()
        for it in self.items:
            if it.entry.state is not Ownership.OWNED:
                raise ValueError(f"bitmap {it.entry.key} is {it.entry.state.value}, not owned")
        for it in self.items:
            it.entry.state = Ownership.MIGRATING
        self.trace.event("migration", destination=self.result.destination,
                         bitmaps=[it.entry.key for it in self.items])
        try:
            await self._connect()
            await self._setup()
            await self._live()
            await self._complete()
            await self.ch.send(End())
            await self.ch.recv("the destination's end")
            self.result.ok = all(it.outcome.ok for it in self.items)
        except (OSError, ProtocolError, PeerError, Timeout, ValueError) as e:
            self.result.error = f"{type(e).__name__}: {e}"
            if isinstance(e, ProtocolError) and hasattr(self, "ch"):
                await self.ch.fail(e)
        finally:
            for it in self.items:  # whatever was not acknowledged stays ours, intact
                it.entry.bitmap.remove_tracker(it.digests.stale)  # one per attempt otherwise
                if it.entry.state is not Ownership.HANDED_OFF:
                    it.entry.bitmap.meta.flags |= it.unconfirmed
                    self.registry.thaw(it.entry, None)
                    if it.outcome.error is None and not it.outcome.ok:
                        it.outcome.error = self.result.error or "not acknowledged"
            if hasattr(self, "ch"):
                await self.ch.close()
                self.result.bytes_sent = self.ch.conn.bytes_sent
                self.result.frames = dict(self.ch.conn.frames_sent)
            self.result.bitmaps = [it.outcome for it in self.items]
            self.result.passes = self.pass_no
            self.result.duration_s = time.monotonic() - self._t0
            # QEMU's flat sha256 of each handed-off bitmap, for reports and cross-checks: not
            # part of the protocol, so computed outside the migration's duration (the bitmap
            # no longer changes here).
            for it in self.items:
                if it.outcome.ok:
                    it.outcome.sha256 = (await asyncio.to_thread(it.entry.bitmap.sha256)).hex()
            self.trace.event("outcome", ok=self.result.ok, error=self.result.error,
                             downtime_ms=self.result.downtime_ms,
                             bytes_sent=self.result.bytes_sent, passes=self.pass_no,
                             bitmaps=[asdict(b) for b in self.result.bitmaps])
            self.trace.flush()
        return self.result

    async def _connect(self) -> None:
        o = self.opts
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                        limit=1 << 20), o.connect_timeout)
        except TimeoutError:
            raise Timeout(f"timed out after {o.connect_timeout:g}s connecting to "
                          f"{self.host}:{self.port}") from None
        except ssl_mod.SSLError as e:
            raise tls.before_hello(e, self.host, self.port, True) from None
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.ch = Channel(reader, writer, Role.SOURCE, self.trace, o.io_timeout)
        try:  # with TLS 1.3 the destination's verdict on our certificate arrives here
            await self.ch.send(Hello(spec.PROTOCOL_VERSION, spec.MIN_PROTOCOL_VERSION,
                                     Role.SOURCE, spec.CAPABILITIES,
                                     f"bitmig/{__version__}"))
            await self.ch.recv("the destination's hello", o.connect_timeout)
        except (ssl_mod.SSLError, ConnectionError, RemoteProtocolError) as e:
            raise tls.before_hello(e, self.host, self.port, self.ssl is not None) from None

    async def _setup(self) -> None:
        for it in self.items:
            e, bm = it.entry, it.entry.bitmap
            self.ch.write(Start(it.id, e.node, e.name, bm.disk_size, bm.granularity,
                                bm.chunk_size, e.enabled, e.persistent, it.live, e.token))
        await self.ch.drain()
        async for it, ev in self._replies(self.items, Ready, "ready for the started bitmaps"):
            if ev.have is not None and it.live:
                try:
                    self._resume(it, ev)
                except RemoteProtocolError as e:  # a mask that does not decode: that bitmap
                    self.ch.writer.writelines(self.ch.conn.error_frame(e))
                    self._fail_item(it, f"{e.code}: {e.message}")
        if not any(it.active for it in self.items):
            raise ValueError("the destination refused every bitmap")

    async def _replies(self, items: list[_Item], kind: type, what: str,
                       timeout: float | None = None) -> AsyncIterator[tuple[_Item, Any]]:
        """The destination's `kind` answer for each of `items`, as it arrives. An error
        frame naming one of them fails that bitmap only; any other error ends the run."""
        waiting = {it.id: it for it in items}
        while waiting:
            try:
                ev = await self.ch.recv(what, timeout)
            except PeerError as e:
                if e.bitmap_id not in waiting:
                    raise
                self._fail_item(waiting.pop(e.bitmap_id), f"{e.code}: {e.message}")
                continue
            if type(ev) is kind and ev.id in waiting:
                yield waiting.pop(ev.id), ev

    def _resume(self, it: _Item, ready: Ready) -> None:
        """The destination kept chunks from an earlier attempt: send only what it lacks
        and what changed here since (the meta bitmap remembers that across attempts)."""
        bm = it.entry.bitmap
        have = decode_have(ready.have_enc or 0, ready.have, bm.nchunks, it.id)
        bm.meta.flags |= ~have
        it.sent |= have  # a resend of these may leave the destination with an older version
        it.resumed = True
        it.outcome.resumed_chunks = int(np.count_nonzero(have))
        self.trace.event("resume", bitmap=it.entry.key, held_chunks=it.outcome.resumed_chunks,
                         to_send=bm.meta.count())

    def _fail_item(self, it: _Item, why: str) -> None:
        it.active = False
        it.outcome.error = why
        self.registry.thaw(it.entry, None)
        self.trace.event("bitmap_failed", bitmap=it.entry.key, error=why)

    async def _live(self) -> None:
        live = [it for it in self.items if it.active and it.live]
        if not live:
            return
        self._sync_t, self._sync_bytes = time.monotonic(), self.ch.conn.bytes_sent
        self._set_phase("bulk")
        for it in live:
            if it.resumed:
                continue  # its meta bitmap already names every chunk still to send
            cw = it.entry.bitmap.chunk_words
            for frames in it.planner.bulk():
                self._write(frames)
                # Hash what was just sent while it is in cache; the destination is slower
                # than this side, so the time is otherwise spent waiting for drain.
                it.digests.refresh(frames[0].first * cw, (frames[-1].first + frames[-1].count) * cw)
                await self._drain_if_needed()
                self._report()
        await asyncio.gather(*(asyncio.to_thread(it.digests.refresh) for it in live))
        await self._sync()
        # The bulk rate (large frames) overstates how fast scattered dirty chunks move, so
        # the first estimate comes from a dirty pass: until then, any pending byte counts.
        bw = 0.0
        self._set_phase("dirty")
        target = self.opts.downtime_ms / 1000
        small = sum(it.entry.bitmap.serialized_size for it in self.items
                    if it.active and not it.live)
        while True:
            live = [it for it in live if it.active]
            if self._pending() == 0:
                break  # nothing dirty: only the small bitmaps are left for completion
            pending = self._pending() + small
            if bw > 0 and pending / bw <= target:
                break
            if self.pass_no >= self.opts.max_passes:
                self.result.forced = True
                self.trace.event("forced", passes=self.pass_no, pending_bytes=pending)
                break
            self.pass_no += 1
            plan = [(it, it.planner.dirty_runs()) for it in live]
            self.trace.event("pass", n=self.pass_no, pending_bytes=pending,
                             chunks=sum(len(r) for _, r in plan), bandwidth=bw)
            for it, runs in plan:
                for first, count in runs:
                    self._write(it.planner.take(first, count))
                    await self._drain_if_needed()
            # Keep leaf hashes fresh so the frozen window rehashes only the last changes.
            await asyncio.gather(*(asyncio.to_thread(it.digests.refresh) for it in live))
            # The pass's own rate, frames and all, predicts the frozen window best.
            bw = await self._sync()
            self._report()

    async def _complete(self) -> None:
        active = [it for it in self.items if it.active]
        self.result.bytes_live = self.ch.conn.bytes_sent
        t0 = time.monotonic()
        self.registry.freeze([it.entry for it in active])
        self._set_phase("completion", pending_bytes=self._pending())
        for it in active:
            frames = it.planner.take_dirty() if it.live else it.planner.take_all()
            self._write(frames)
            bm = it.entry.bitmap
            digest = it.digests.digest()
            it.outcome.count = bm.count()
            it.outcome.digest = digest.hex()
            self.ch.write(Complete(it.id, digest, bm.count()))
        await self.ch.drain("the destination to take the final chunks")
        async for it, ev in self._replies(active, Ack, "acknowledgements",
                                          self.opts.ack_timeout):
            if ev.digest.hex() != it.outcome.digest:
                self.ch.write(Error(ErrorCode.DIGEST_MISMATCH,
                                    "ack digest differs from the one sent", it.id))
                self._fail_item(it, "destination acknowledged a different digest")
                continue
            # The acknowledgement is the handoff: from here the destination owns it.
            self.registry.thaw(it.entry, self.result.destination)
            it.outcome.ok = True
            self.trace.event("handoff", bitmap=it.entry.key, owner=self.result.destination)
        self.result.downtime_ms = (time.monotonic() - t0) * 1000
        self._set_phase("done", downtime_ms=self.result.downtime_ms)
