"""The destination's decisions, sans-IO: per-bitmap intake, the memory budget, parking
for a resume, claiming and replacing, verification and commit.

Two objects. `Intake` is shared by every connection of a daemon: the memory budget, the
names being received, the bitmaps parked after a cut (with their expiry), the caps.
`DestinationSession` serves one connection: it takes the Connection's events and the
completions of the I/O it asked for, with `now`, and returns actions for the adapter to
carry out (bitmig.daemon.receiver). No socket, file descriptor, thread or clock in here:
spools are named by handles, time is an argument, and the one timer (park expiry) is
returned by `Intake.next_timer()` and fired with `Intake.handle_timer(now)`.

Every I/O action whose outcome matters is answered by an event: Allocate by Allocated
or AllocFailed, OpenSpool/ReopenSpool by SpoolOpened or StoreFailed, WriteRange only by
StoreFailed (when it fails), Sync by Synced, Commit by Stored or StoreFailed, Check and
Deliver by TargetOk or TargetRefused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from bitmig import __version__
from bitmig.core import defaults
from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap, serialized_size
from bitmig.core.store import StoredMeta
from bitmig.protocol import spec
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import (
    Ack,
    BitmapFailed,
    Bits,
    Complete,
    End,
    Error,
    Hello,
    Mark,
    Ready,
    Spans,
    Start,
    Zeroes,
)
from bitmig.protocol.have import encode_have
from bitmig.protocol.spec import ErrorCode
from bitmig.session.target import Incoming

Key = tuple[str, str]  # (node, name)

# Bytes spooled to disk between background fsyncs: keeps the work left for the frozen
# window small without syncing every frame.
SYNC_EVERY = 32 << 20


class StoredBitmaps(Protocol):
    """What the session must know of the bitmaps the daemon owns or has stored."""

    def holds(self, node: str, name: str) -> bool:
        """A bitmap of that name is owned or stored here (bitmaps arriving are not
        asked about: the Intake knows them)."""

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        """The stored copy an earlier attempt of this migration left (same token) whose
        ack was lost, while nothing changed it here; else None."""


# -- actions (session -> adapter) ------------------------------------------------------


@dataclass(slots=True)
class Send:
    event: Any  # a protocol event: the adapter passes it to Connection.send


@dataclass(slots=True)
class Refuse:
    """Report a per-bitmap error frame (Connection.error_frame); the connection goes on."""

    id: int
    code: ErrorCode
    message: str


@dataclass(slots=True)
class Allocate:
    """Build Assembly(start) (large: off the event loop); with `base`, start from its
    words with every chunk received (the lost-ack replace)."""

    id: int
    start: Start
    base: DirtyBitmap | None = None


@dataclass(slots=True)
class OpenSpool:
    """Create the temp file of spool `spool`; with `initial`, write it first."""

    id: int
    spool: int
    node: str
    name: str
    size: int
    initial: memoryview | None = None


@dataclass(slots=True)
class ReopenSpool:
    """Open the temp file of a parked spool again (it was closed when parked)."""

    id: int
    spool: int


@dataclass(slots=True)
class WriteRange:
    id: int
    spool: int
    offset: int
    data: memoryview


@dataclass(slots=True)
class Sync:
    """fdatasync the spool in the background; answer Synced when done."""

    id: int
    spool: int


@dataclass(slots=True)
class CloseSpool:
    """Parking: close the spool's descriptor, keep its temp file (after a running sync)."""

    spool: int


@dataclass(slots=True)
class DiscardSpool:
    """Close and delete the spool's temp file (after a running sync)."""

    spool: int


@dataclass(slots=True)
class Commit:
    """Store durably: the spool's header + fdatasync + rename + directory fsync (or the
    whole bitmap when there is no spool). The adapter stamps `stored_at` and answers
    Stored(id, meta) or StoreFailed; it may carry out the commits due together as one
    group commit (bitmig.daemon.spools), and frames go on arriving meanwhile."""

    id: int
    meta: StoredMeta
    bitmap: DirtyBitmap
    spool: int | None


@dataclass(slots=True)
class Unstore:
    """Remove the stored copy: the target refused a bitmap already committed, or the
    bitmap failed (or the source aborted it) while its commit ran."""

    node: str
    name: str


@dataclass(slots=True)
class Check:
    id: int
    bitmap: Incoming


@dataclass(slots=True)
class Deliver:
    id: int
    bitmap: Incoming
    data: DirtyBitmap


@dataclass(slots=True)
class Own:
    """The daemon owns the verified bitmap now (replacing the earlier copy if asked)."""

    meta: StoredMeta
    bitmap: DirtyBitmap
    replace: bool


@dataclass(slots=True)
class Note:
    """A trace record."""

    what: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CloseConnection:
    """The protocol ended (both `end`s exchanged)."""


Action = (Send | Refuse | Allocate | OpenSpool | ReopenSpool | WriteRange | Sync | CloseSpool
          | DiscardSpool | Commit | Unstore | Check | Deliver | Own | Note | CloseConnection)


# -- completions (adapter -> session) ----------------------------------------------------


@dataclass(slots=True)
class Allocated:
    id: int
    assembly: Assembly


@dataclass(slots=True)
class AllocFailed:
    id: int
    message: str


@dataclass(slots=True)
class SpoolOpened:
    id: int


@dataclass(slots=True)
class Synced:
    id: int
    error: str | None = None


@dataclass(slots=True)
class Stored:
    id: int
    meta: StoredMeta


@dataclass(slots=True)
class StoreFailed:
    id: int
    message: str


@dataclass(slots=True)
class TargetOk:
    id: int


@dataclass(slots=True)
class TargetRefused:
    id: int
    code: ErrorCode
    message: str


Completion = (Allocated | AllocFailed | SpoolOpened | Synced | Stored | StoreFailed | TargetOk
              | TargetRefused)


# -- the host-wide part -------------------------------------------------------------------


@dataclass(slots=True)
class Parked:
    """A bitmap cut off mid-stream, kept for a retry with the same token."""

    start: Start
    assembly: Assembly
    spool: int | None  # its temp file, descriptor closed
    cost: int  # budget it holds
    deadline: float


class Intake:
    """Host-wide admission of arriving bitmaps: memory budget, reserved names, caps, and
    the parked bitmaps with their expiry. Shared by every DestinationSession."""

    def __init__(self, memory_budget: int = defaults.MEMORY_BUDGET, *,
                 resume_timeout: float = defaults.RESUME_TIMEOUT,
                 max_bitmaps: int = defaults.MAX_HELD_BITMAPS,
                 max_per_connection: int = defaults.MAX_BITMAPS_PER_CONNECTION,
                 min_cost: int = defaults.MIN_BITMAP_COST, durable: bool = True) -> None:
        self.memory_budget = memory_budget
        self.resume_timeout = resume_timeout
        self.max_bitmaps = max_bitmaps
        self.max_per_connection = max_per_connection
        self.min_cost = min_cost
        self.durable = durable  # the daemon has a state directory: spool and commit
        self.budget_used = 0
        self.held = 0  # bitmaps holding resources: being received, or parked
        self.reserved: set[Key] = set()  # names being received or parked
        self.parked: dict[Key, Parked] = {}
        self._spools = 0

    def cost(self, serialized_size: int) -> int:
        """What a bitmap costs in the budget: its memory, but at least min_cost, for the
        descriptor, temp file and bookkeeping every bitmap holds however small."""
        return max(serialized_size, self.min_cost)

    def new_spool(self) -> int:
        self._spools += 1
        return self._spools

    def admit(self, cost: int, now: float) -> tuple[str | None, list[Action]]:
        """Take budget and a place for one more bitmap. Parked bitmaps give way (oldest
        first): they only save a retry some work, and must never make a migration fail.
        Returns (why not, or None; actions for the parked bitmaps discarded)."""
        out: list[Action] = []
        while self.parked and (self.held >= self.max_bitmaps
                               or self.budget_used + cost > self.memory_budget):
            oldest = min(self.parked.values(), key=lambda p: p.deadline)
            self._discard(oldest, out, "evicted")
        if self.held >= self.max_bitmaps:
            return f"the destination holds {self.held} bitmaps, its limit", out
        if self.budget_used + cost > self.memory_budget:
            return (f"bitmap of {cost} bytes exceeds the destination's free memory "
                    f"budget"), out
        self.budget_used += cost
        self.held += 1
        return None, out

    def release(self, cost: int) -> None:
        """A bitmap admitted here holds nothing any more."""
        self.budget_used -= cost
        self.held -= 1

    def park(self, p: Parked) -> list[Action]:
        key = (p.start.node, p.start.name)
        self.parked[key] = p
        self.reserved.add(key)
        out: list[Action] = [Note("parked", {"bitmap": f"{key[0]}/{key[1]}",
                                             "held_chunks": int(p.assembly.received.sum())})]
        if p.spool is not None:
            out.insert(0, CloseSpool(p.spool))
        return out

    def claim(self, start: Start, now: float) -> tuple[Parked | None, list[Action]]:
        """The parked chunks of this bitmap, when the start is a retry of the same
        migration (same token, same geometry), still owning its budget and name; a parked
        bitmap that does not match is discarded: a fresh start must not be mixed with
        another attempt's chunks."""
        out = self.handle_timer(now)
        key = (start.node, start.name)
        p = self.parked.get(key)
        if p is None:
            return None, out
        s = p.start
        if (start.token is None or start.token != s.token or
                (s.disk_size, s.granularity, s.chunk_size) !=
                (start.disk_size, start.granularity, start.chunk_size)):
            self._discard(p, out, "discarded")
            return None, out
        del self.parked[key]
        return p, out

    def next_timer(self) -> float | None:
        """When handle_timer must run next (the earliest park expiry), or None."""
        return min((p.deadline for p in self.parked.values()), default=None)

    def handle_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        for p in [p for p in self.parked.values() if p.deadline <= now]:
            self._discard(p, out, "discarded")
        return out

    def _discard(self, p: Parked, out: list[Action], why: str) -> None:
        key = (p.start.node, p.start.name)
        del self.parked[key]
        self.reserved.discard(key)
        self.release(p.cost)
        if p.spool is not None:
            out.append(DiscardSpool(p.spool))
        out.append(Note(why, {"bitmap": f"{key[0]}/{key[1]}"}))


# -- one connection ----------------------------------------------------------------------


class Phase(Enum):
    CHECKING = "checking"  # the target's check runs
    ALLOCATING = "allocating"  # the assembly is being built
    OPENING = "opening"  # the spool is being created or reopened
    STREAMING = "streaming"  # ready sent: bits and zeroes flow
    SYNCING = "syncing"  # complete arrived while a background sync ran
    STORING = "storing"  # Commit runs
    FAILED = "failed"  # its commit failed: being forgotten
    DELIVERING = "delivering"  # the target's deliver runs


@dataclass(slots=True)
class _Bitmap:
    start: Start
    cost: int
    phase: Phase
    asm: Assembly | None = None
    spool: int | None = None
    base: DirtyBitmap | None = None  # the stored copy a lost-ack retry replaces
    resumed: bool = False
    unsynced: int = 0
    syncing: bool = False
    resync: bool = False  # a mark waits for data written after the running sync began
    complete: Complete | None = None
    meta: StoredMeta | None = None
    stored: bool = False  # committed durably (a target refusal must undo it)
    abandoned: bool = False  # failed or aborted while its commit ran: undo what it stores
    t_complete: float = 0.0

    @property
    def key(self) -> Key:
        return (self.start.node, self.start.name)


def _incoming(s: Start) -> Incoming:
    return Incoming(s.node, s.name, s.disk_size, s.granularity, s.enabled, s.persistent)


class DestinationSession:
    """The destination's side of one connection: Connection events and I/O completions
    in, actions out (see the module's docstring)."""

    def __init__(self, intake: Intake, stored: StoredBitmaps, peer: str, *,
                 target: bool = False, sync_every: int | None = None) -> None:
        self.intake = intake
        self.stored = stored
        self.peer = peer
        self.target = target  # a delivery target checks and takes every bitmap
        self.sync_every = SYNC_EVERY if sync_every is None else sync_every
        self.bitmaps: dict[int, _Bitmap] = {}  # started here and holding resources
        self.greeted = False
        self.finished = False  # `end` answered: the adapter closes
        self.marks: list[int] = []  # echoes held until the spools' syncs end (_mark)
        self._dispatch = {
            Hello: self._hello, Start: self._start, Bits: self._apply, Zeroes: self._apply,
            Spans: self._apply_spans,
            Complete: self._complete, Mark: self._mark, End: self._end,
            Error: self._peer_error, BitmapFailed: self._bitmap_failed,
            Allocated: self._allocated, AllocFailed: self._alloc_failed,
            SpoolOpened: self._spool_opened, Synced: self._synced, Stored: self._stored,
            StoreFailed: self._store_failed, TargetOk: self._target_ok,
            TargetRefused: self._target_refused,
        }

    def handle(self, event: Any, now: float) -> list[Action]:
        """An event from the Connection (a peer error frame as an Error event) or the
        completion of an action. Events naming a bitmap no longer held are ignored."""
        out = self._dispatch[type(event)](event, now)
        if self.marks and not any(b.syncing for b in self.bitmaps.values()):
            out += [Send(Mark(seq)) for seq in self.marks]
            self.marks.clear()
        return out

    # -- the connection ---------------------------------------------------------------

    def _hello(self, ev: Hello, now: float) -> list[Action]:
        self.greeted = True
        version = min(ev.version, spec.PROTOCOL_VERSION)
        return [Send(Hello(version, spec.MIN_PROTOCOL_VERSION, spec.Role.DESTINATION,
                           spec.CAPABILITIES, f"bitmig/{__version__}"))]

    def _mark(self, ev: Mark, now: float) -> list[Action]:
        # Everything before the mark is applied: sync every spool in the background and
        # echo the mark once that is durable (handle()). The source freezes only after an
        # echo, so the frozen window flushes only what arrives after it, not a backlog of
        # earlier passes; and the rate the source measures is what the disk absorbs.
        out: list[Action] = []
        for bid, b in self.bitmaps.items():
            if b.phase is Phase.STREAMING and b.spool is not None:
                if not b.syncing:
                    b.syncing, b.unsynced = True, 0
                    out.append(Sync(bid, b.spool))
                elif b.unsynced:  # written after the running sync began: once more
                    b.resync = True
        self.marks.append(ev.seq)
        return out

    def _end(self, ev: End, now: float) -> list[Action]:
        self.finished = True
        return [Send(End()), CloseConnection()]

    def close(self, now: float, cut: bool) -> list[Action]:
        """The connection is over. `cut`: it broke (EOF, reset, timeout, or the peer's
        fatal error frame): a bitmap mid-stream with a token is parked for a retry.
        Otherwise (this side found a fatal error) every bitmap not acknowledged is
        discarded. Either way nothing else of this connection is kept."""
        out: list[Action] = []
        for bid in list(self.bitmaps):
            b = self.bitmaps[bid]
            if b.asm is not None:
                b.asm.abandon()  # a payload cut short inside the bitmap's memory
            if (cut and b.start.token is not None and b.base is None and b.asm is not None
                    and b.phase in (Phase.STREAMING, Phase.SYNCING)):
                del self.bitmaps[bid]
                out += self.intake.park(Parked(b.start, b.asm, b.spool, b.cost,
                                               now + self.intake.resume_timeout))
            else:
                self._drop(bid, out)
        return out

    # -- starting a bitmap ------------------------------------------------------------

    def _start(self, ev: Start, now: float) -> list[Action]:
        bid, it = ev.id, self.intake
        if len(self.bitmaps) >= it.max_per_connection:
            return [Refuse(bid, ErrorCode.LIMIT, f"more than {it.max_per_connection} "
                                                 "bitmaps held for one connection")]
        parked, out = it.claim(ev, now)
        if parked is not None:  # a retry: carry on from what arrived last time
            b = _Bitmap(ev, parked.cost, Phase.CHECKING, parked.assembly, parked.spool,
                        resumed=True)
            self.bitmaps[bid] = b
            return out + self._check(bid, b)
        base = self.stored.replaceable(ev) if ev.token is not None else None
        if (ev.node, ev.name) in it.reserved or (
                base is None and self.stored.holds(ev.node, ev.name)):
            out.append(Refuse(bid, ErrorCode.EXISTS, f"bitmap {ev.node}/{ev.name} already "
                                                     "exists on the destination"))
            return out
        cost = it.cost(serialized_size(ev.disk_size, ev.granularity))
        why, evicted = it.admit(cost, now)
        out += evicted
        if why is not None:
            out.append(Refuse(bid, ErrorCode.LIMIT, why))
            return out
        it.reserved.add((ev.node, ev.name))
        b = _Bitmap(ev, cost, Phase.CHECKING, base=base)
        self.bitmaps[bid] = b
        return out + self._check(bid, b)

    def _check(self, bid: int, b: _Bitmap) -> list[Action]:
        if self.target:
            return [Check(bid, _incoming(b.start))]
        return self._prepare(bid, b)

    def _prepare(self, bid: int, b: _Bitmap) -> list[Action]:
        """After the target's check: the assembly, then the spool, then ready."""
        if b.asm is None:
            b.phase = Phase.ALLOCATING
            return [Allocate(bid, b.start, b.base)]
        if b.resumed and b.spool is not None:
            b.phase = Phase.OPENING
            return [ReopenSpool(bid, b.spool)]
        if self.intake.durable and b.spool is None:
            b.phase = Phase.OPENING
            b.spool = self.intake.new_spool()
            initial = None
            if b.base is not None:  # the replace starts from the stored copy's words
                initial = memoryview(b.asm.bitmap.words).cast("B")
            return [OpenSpool(bid, b.spool, b.start.node, b.start.name,
                              b.asm.bitmap.serialized_size, initial)]
        return self._ready(bid, b)

    def _ready(self, bid: int, b: _Bitmap) -> list[Action]:
        b.phase = Phase.STREAMING
        asm = b.asm
        if not (b.resumed or b.base is not None):
            return [Send(Ready(bid))]
        have = encode_have(asm.received)
        if have is None:  # too many chunks to list in one frame: start over
            asm.received[:] = False
            return [Send(Ready(bid))]
        out: list[Action] = [Send(Ready(bid, have[1], have[0]))]
        if b.resumed:
            out.insert(0, Note("resume", {"id": bid, "held_chunks": int(asm.received.sum())}))
        return out

    def _target_ok(self, ev: TargetOk, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None:
            return []
        if b.phase is Phase.CHECKING:
            return self._prepare(ev.id, b)
        if b.phase is Phase.DELIVERING:
            return self._own(ev.id, b, now)
        return []

    def _target_refused(self, ev: TargetRefused, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None:
            return []
        out: list[Action] = []
        if b.stored:  # delivered-but-refused: no stored copy may look valid
            out.append(Unstore(b.start.node, b.start.name))
        return out + self._refuse(ev.id, ev.code, ev.message)

    def _allocated(self, ev: Allocated, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.ALLOCATING:
            return []
        b.asm = ev.assembly
        return self._prepare(ev.id, b)

    def _alloc_failed(self, ev: AllocFailed, now: float) -> list[Action]:
        return self._refuse(ev.id, ErrorCode.LIMIT, f"cannot allocate the bitmap: {ev.message}")

    def _spool_opened(self, ev: SpoolOpened, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.OPENING:
            return []
        return self._ready(ev.id, b)

    # -- streaming --------------------------------------------------------------------

    def landing(self, ev: Bits) -> memoryview | None:
        """Where the payload of a checked bits frame, still arriving, may be received in
        place (the adapter asks while every earlier frame is handled; the frame then comes
        to handle() as usual): the bitmap's own memory for a raw payload, else None."""
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.STREAMING or b.asm is None:
            return None
        return b.asm.landing(ev)

    def _apply(self, ev: Bits | Zeroes, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.STREAMING:
            return []  # in flight when this side failed the bitmap: discarded
        asm = b.asm
        write = b.spool is not None
        if write and type(ev) is Zeroes and not asm.received[ev.first : ev.first + ev.count
                                                              ].any():
            write = False  # the spool file starts as zeroes: nothing to write
        try:
            asm.apply(ev)
        except RemoteProtocolError as e:  # a payload that does not decode: that bitmap
            return self._refuse(ev.id, e.code, e.message)
        bm = asm.bitmap
        # Rehash the blocks just written, here and now: in a worker thread the hashing
        # loop fights the event loop for the GIL and slowed the stream 3x.
        asm.digests.refresh(ev.first * bm.chunk_words, (ev.first + ev.count) * bm.chunk_words)
        if not write:
            return []
        data = bm.serialize(ev.first, ev.count)
        w = WriteRange(ev.id, b.spool, ev.first * bm.chunk_size, data)
        b.unsynced += data.nbytes
        if b.unsynced < self.sync_every or b.syncing:
            return [w]
        b.syncing, b.unsynced = True, 0
        return [w, Sync(ev.id, b.spool)]

    def _apply_spans(self, ev: Spans, now: float) -> list[Action]:
        """Many runs in one frame: one decode and one store (numpy), one digest refresh
        over the frame's extent, one spool write per run (a contiguous range)."""
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.STREAMING:
            return []
        asm = b.asm
        try:
            firsts, counts = asm.apply_spans(ev)
        except RemoteProtocolError as e:
            return self._refuse(ev.id, e.code, e.message)
        bm = asm.bitmap
        cw = bm.chunk_words
        asm.digests.refresh(int(firsts[0]) * cw, int(firsts[-1] + counts[-1]) * cw)
        if b.spool is None:
            return []
        out: list[Action] = []
        for first, count in zip(firsts.tolist(), counts.tolist(), strict=True):
            data = bm.serialize(first, count)
            out.append(WriteRange(ev.id, b.spool, first * bm.chunk_size, data))
            b.unsynced += data.nbytes
        if b.unsynced >= self.sync_every and not b.syncing:
            b.syncing, b.unsynced = True, 0
            out.append(Sync(ev.id, b.spool))
        return out

    def _synced(self, ev: Synced, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None:
            return []
        b.syncing = False
        if ev.error is not None:
            # Reported now: the kernel reports a writeback error only once, so a later
            # fsync could succeed over lost pages.
            return self._refuse(ev.id, ErrorCode.STORAGE, ev.error)
        if b.phase is Phase.SYNCING:
            return self._verify(ev.id, b, b.complete, now)
        if b.resync and b.phase is Phase.STREAMING:
            b.resync, b.syncing, b.unsynced = False, True, 0
            return [Sync(ev.id, b.spool)]
        return []

    # -- completing -------------------------------------------------------------------

    def _complete(self, ev: Complete, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.STREAMING:
            return []
        if b.syncing:  # the sync that runs must finish (and succeed) first
            b.phase, b.complete = Phase.SYNCING, ev
            return []
        return self._verify(ev.id, b, ev, now)

    def _verify(self, bid: int, b: _Bitmap, ev: Complete, now: float) -> list[Action]:
        asm = b.asm
        try:
            digest = asm.verify(ev)
        except RemoteProtocolError as e:
            return self._refuse(bid, e.code, e.message)
        s = b.start
        if b.base is not None and self.stored.replaceable(s) is None:
            # The copy being replaced changed here while the retry streamed: keep it.
            return self._refuse(bid, ErrorCode.EXISTS, f"bitmap {s.node}/{s.name} changed on "
                                                       "the destination since it arrived; "
                                                       "not replaced")
        b.meta = StoredMeta(node=s.node, name=s.name, disk_size=s.disk_size,
                            granularity=s.granularity, chunk_size=s.chunk_size,
                            enabled=s.enabled, persistent=s.persistent,
                            count=asm.bitmap.count(), digest=digest, stored_at=0.0,
                            origin=self.peer, token=s.token or b"")
        b.t_complete = now
        if self.intake.durable:
            b.phase = Phase.STORING
            return [Commit(bid, b.meta, asm.bitmap, b.spool)]
        return self._deliver(bid, b, now)

    def _stored(self, ev: Stored, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is None or b.phase is not Phase.STORING:
            return []
        b.meta, b.stored, b.spool = ev.meta, True, None  # the spool is the stored file now
        if b.abandoned:  # never acknowledged: the source owns it, no copy stays here
            b.phase = Phase.FAILED
            out: list[Action] = [Unstore(b.start.node, b.start.name)]
            self._drop(ev.id, out)
            return out
        return self._deliver(ev.id, b, now)

    def _deliver(self, bid: int, b: _Bitmap, now: float) -> list[Action]:
        if self.target:
            b.phase = Phase.DELIVERING
            return [Deliver(bid, _incoming(b.start), b.asm.bitmap)]
        return self._own(bid, b, now)

    def _own(self, bid: int, b: _Bitmap, now: float) -> list[Action]:
        asm, s = b.asm, b.start
        asm.bitmap.remove_tracker(asm.digests.stale)  # the owned bitmap needs no leaf hashes
        del self.bitmaps[bid]
        self.intake.reserved.discard(b.key)
        self.intake.release(b.cost)
        return [Own(b.meta, asm.bitmap, b.base is not None), Send(Ack(bid, b.meta.digest)),
                Note("stored", {"bitmap": f"{s.node}/{s.name}", "digest": b.meta.digest.hex(),
                                "count": b.meta.count,
                                "store_ms": round((now - b.t_complete) * 1000, 3)})]

    # -- failures ---------------------------------------------------------------------

    def _store_failed(self, ev: StoreFailed, now: float) -> list[Action]:
        b = self.bitmaps.get(ev.id)
        if b is not None and b.phase is Phase.STORING:
            b.spool, b.phase = None, Phase.FAILED  # a failed commit removed its temp file
            if b.abandoned:  # already refused or aborted
                out: list[Action] = []
                self._drop(ev.id, out)
                return out
        return self._refuse(ev.id, ErrorCode.STORAGE, ev.message)

    def _bitmap_failed(self, ev: BitmapFailed, now: float) -> list[Action]:
        return self._refuse(ev.id, ErrorCode(ev.code), ev.message)

    def _peer_error(self, ev: Error, now: float) -> list[Action]:
        """The source failed (aborted) one bitmap: forget it."""
        out: list[Action] = []
        if ev.id is not None:
            self._drop(ev.id, out)
        return out

    def _refuse(self, bid: int, code: ErrorCode, message: str) -> list[Action]:
        out: list[Action] = [Refuse(bid, code, message)]
        self._drop(bid, out)
        return out

    def _drop(self, bid: int, out: list[Action]) -> None:
        """Forget a bitmap that will not complete: nothing of it is kept. One whose
        commit runs (the adapter commits in the background, in groups) is forgotten
        when the commit ends (_stored, _store_failed)."""
        b = self.bitmaps.get(bid)
        if b is None:
            return
        if b.phase is Phase.STORING:
            b.abandoned = True
            return
        del self.bitmaps[bid]
        if b.spool is not None:
            out.append(DiscardSpool(b.spool))
        self.intake.reserved.discard(b.key)
        self.intake.release(b.cost)
