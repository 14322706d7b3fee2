"""The source side of a migration as a sans-IO session: every decision, no I/O.

`SourceSession` owns the sequence hello -> start/ready (resume) -> bulk pass -> dirty
passes -> frozen groups (freeze -> complete/ack, handoff) -> end, the convergence rule,
the bandwidth estimate (mark round trips), the size of each frozen group, how many bitmaps
are in flight at the destination (starts refused for a limit go again), a new connection
past spec.MAX_BITMAPS starts, per-bitmap failures and retries with backoff. It owns the
protocol `Connection` of each attempt: bytes from the peer go in, bytes to send come out
inside actions. It is told the time (`now`, seconds on any monotonic clock) with every
call and never reads a clock, a socket or a file; an adapter (bitmig.daemon.migration)
carries out its actions.

Every method returns a list of actions, to be carried out in order:

- `Connect(at, attempt)`: open a connection at time `at`; then call `connected(now)` or
  `connect_failed(now, exc)`. (After a Close, within an attempt too: past
  spec.MAX_BITMAPS starts on one connection, the rest go on a new one.)
- `Send(buffers)`: write these bytes now, before yielding to anything that may mutate a
  bitmap (payloads are views into the bitmaps).
- `WantWrite()`: call `writable(now)` as soon as the transport can take more (at once if
  its buffer is below the high-water mark, after a drain otherwise).
- `SetTimer(at)`: call `timer(now)` at time `at` or later (one timer; the latest replaces).
- `Compute(jobs)`: run these callables (worker threads are fine), then call `computed(now)`.
- `Freeze(ids)`: run the before-freeze hooks, hold mutations of these bitmaps (one group),
  then call `frozen(now)`. `Unfreeze(ids)`: apply held mutations; they stay in the migration.
  `HandOff(id, owner)`: the destination owns that bitmap now.
- `Close()`: close the connection (after writing what was sent).
- `Note(kind, fields)`: a trace event. `Progress(fields)`: a progress report.
- `AttemptDone(result, retry_at)`: one attempt ended (retry_at None: no retry follows).
- `Finished(result)`: the migration is over; bitmaps not handed off stay with the source.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from bitmig import __version__
from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import DigestCache
from bitmig.core.planner import Frame, Planner
from bitmig.core.units import parse_size
from bitmig.protocol import spec
from bitmig.protocol.connection import Connection, FrameObserver
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import (
    Ack,
    BitmapFailed,
    Complete,
    End,
    Error,
    Event,
    Hello,
    Mark,
    Ready,
    Spans,
    Start,
    Zeroes,
)
from bitmig.protocol.have import decode_have
from bitmig.protocol.runs import decode_runs, spread
from bitmig.protocol.spec import ErrorCode, Role

GATE_POLL = 0.05  # seconds between keep-alive marks while the freeze gate is closed
PASS_BATCH_DIVISOR = 2  # a dirty pass hands out frame_payload / this raw bytes per write

# -- options and results -------------------------------------------------------------------


class OptionsError(ValueError):
    """A migration option given by a user is out of range; the message names it."""


@dataclass
class MigrationOptions:
    downtime_ms: float = defaults.DOWNTIME_MS
    max_passes: int = defaults.MAX_PASSES
    small_threshold: int = defaults.SMALL_THRESHOLD
    frame_payload: int = defaults.FRAME_PAYLOAD
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    io_timeout: float = defaults.IO_TIMEOUT
    ack_timeout: float = defaults.ACK_TIMEOUT
    retries: int = 1  # attempts in all (the CLI's --retries); 1: no retry
    retry_delay: float = defaults.RETRY_DELAY  # seconds before the first retry; doubles
    wait_for_complete: bool = False  # freeze only once released (live QEMU sources)

    def validate(self) -> MigrationOptions:
        """Raise OptionsError unless every option is in range; returns self."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise OptionsError(f"{name!r} must be {what}, got {getattr(self, name)!r}")

        # Upper bounds keep a typo from meaning "wait an hour" or "pass forever".
        for name, hi in (("downtime_ms", 3_600_000), ("retry_delay", 86_400)):
            v = getattr(self, name)
            need(_is_number(v) and math.isfinite(v) and 0 <= v <= hi, name,
                 f"a number in [0, {hi}]")
        for name in ("connect_timeout", "io_timeout", "ack_timeout"):
            v = getattr(self, name)
            need(_is_number(v) and math.isfinite(v) and v > 0, name, "a number of seconds > 0")
        for name, top in (("max_passes", 1_000_000), ("small_threshold", spec.MAX_U64),
                          ("retries", 1000)):
            v = getattr(self, name)
            need(_is_int(v) and 0 <= v <= top, name, f"a whole number in [0, {top}]")
        need(_is_int(self.frame_payload) and
             spec.MIN_CHUNK_SIZE <= self.frame_payload <= spec.MAX_FRAME_PAYLOAD,
             "frame_payload", f"between {spec.MIN_CHUNK_SIZE} and {spec.MAX_FRAME_PAYLOAD}")
        need(isinstance(self.wait_for_complete, bool), "wait_for_complete", "true or false")
        return self


_SIZES = ("small_threshold", "frame_payload")  # may be given as "64K" and the like
OPTION_NAMES = tuple(f.name for f in fields(MigrationOptions))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def build_options(values: Mapping[str, Any], base: MigrationOptions | None = None,
                  ) -> MigrationOptions:
    """The one way to build MigrationOptions from user input (CLI, control, demo).

    `values` maps option names to values; None means "not given" (keep `base`'s value).
    Sizes may be strings such as "64K"; ints are accepted where numbers are wanted.
    Raises OptionsError naming the option at fault.
    """
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise OptionsError(f"unknown migration option(s) {', '.join(unknown)}; known: "
                           f"{', '.join(OPTION_NAMES)}")
    out = asdict(base or MigrationOptions())
    for name, v in values.items():
        if v is None:
            continue
        if name in _SIZES and isinstance(v, str):
            try:
                v = parse_size(v)
            except ValueError as e:
                raise OptionsError(f"{name!r}: {e}") from None
        out[name] = v
    return MigrationOptions(**out).validate()


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
    attempt: int = 1  # which attempt this is (1 = the first)
    bitmaps: list[BitmapOutcome] = field(default_factory=list)
    passes: int = 0
    forced: bool = False  # completion forced by max_passes
    bytes_sent: int = 0
    bytes_live: int = 0  # bytes sent outside the frozen windows
    frames: dict[str, int] = field(default_factory=dict)  # every frame sent, by kind
    zero_runs: int = 0
    chunks_sent: int = 0
    # The longest window any bitmap was frozen (what a disk's writers wait), from the
    # freeze of its group to the last acknowledgement of that group.
    downtime_ms: float = 0.0
    frozen_total_ms: float = 0.0  # the frozen windows of every group, added up
    groups: int = 0  # frozen windows (groups of bitmaps completed together)
    duration_s: float = 0.0
    bitmap_bytes: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OutgoingBitmap:
    """A bitmap to migrate, as the session sees it: no ownership, only what goes out."""

    node: str
    name: str
    bitmap: DirtyBitmap
    token: bytes  # one per bitmap until it is handed off: retries present the same one
    enabled: bool = True
    persistent: bool = False

    @property
    def key(self) -> str:
        return f"{self.node}/{self.name}"


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    at: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Send:
    buffers: list[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class WantWrite:
    pass


@dataclass(frozen=True, slots=True)
class SetTimer:
    at: float


@dataclass(frozen=True, slots=True)
class Compute:
    jobs: list[Callable[[], Any]]


@dataclass(frozen=True, slots=True)
class Freeze:
    ids: list[int]


@dataclass(frozen=True, slots=True)
class Unfreeze:
    ids: list[int]


@dataclass(frozen=True, slots=True)
class HandOff:
    id: int
    owner: str


@dataclass(frozen=True, slots=True)
class Close:
    pass


@dataclass(frozen=True, slots=True)
class Note:
    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Progress:
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AttemptDone:
    result: MigrationResult
    retry_at: float | None


@dataclass(frozen=True, slots=True)
class Finished:
    result: MigrationResult


Action = (Connect | Send | WantWrite | SetTimer | Compute | Freeze | Unfreeze | HandOff
          | Close | Note | Progress | AttemptDone | Finished)


# -- the session ---------------------------------------------------------------------------


class Step(Enum):
    IDLE = "idle"  # before the first attempt, or waiting to reconnect
    CONNECTING = "connecting"
    HELLO = "hello"  # hello sent, the destination's due
    READY = "ready"  # waiting for readies, or for a refused start's backoff to pass
    BULK = "bulk"  # streaming every chunk once
    SYNC = "sync"  # mark sent, its echo due
    PASS = "pass"  # streaming a dirty pass
    REFRESH = "refresh"  # digest leaves being rehashed (Compute)
    GATE = "gate"  # nothing left to pass, waiting for the freeze gate to open
    FREEZING = "freezing"  # Freeze asked, frozen() due
    DRAINING = "draining"  # a group's final chunks and completes written, waiting for drain
    ACKS = "acks"  # the group's acks due
    ENDING = "ending"  # end sent, the destination's due
    DONE = "done"


class Stage(Enum):
    """Where one bitmap is in the current attempt."""

    QUEUED = "queued"  # not started (yet, or again after a `limit` refusal)
    STARTING = "starting"  # start sent, ready due
    READY = "ready"  # ready: a small one waits for its group, a live one for its bulk pass
    LIVE = "live"  # a live bitmap in the dirty passes
    FROZEN = "frozen"  # in the frozen group: final chunks and complete sent, ack due
    DONE = "done"  # acknowledged: the destination owns it


class _AttemptFailed(Exception):
    """Ends the current attempt; the message becomes MigrationResult.error."""


class BitmapSend:
    """One bitmap in one attempt: its planner, digest leaves and what was sent."""

    def __init__(self, index: int, out: OutgoingBitmap, opts: MigrationOptions) -> None:
        bm = out.bitmap
        self.id = index  # stable in the attempt: Freeze, Unfreeze and HandOff name it
        self.wire = index  # its id on the wire: a new one at every start
        self.out = out
        self.frame_payload = opts.frame_payload
        self.planner = Planner(bm, index, opts.frame_payload)
        self.live = bm.serialized_size > opts.small_threshold
        self.digests = DigestCache(bm)
        self.outcome = BitmapOutcome(out.node, out.name, False, self.live,
                                     serialized_size=bm.serialized_size)
        self.active = True  # not failed (yet) in this attempt
        self.resumed = False
        self.stage = Stage.QUEUED
        self.refusals = 0  # `limit` refusals of its start in this attempt
        self.again_at = 0.0  # a refused start is tried again from this time on...
        self.again_after = -1  # ...or once the attempt counted more acks than this
        # Chunks the destination may hold an older version of: sent before (in this attempt
        # or, per `have`, an earlier one) and sent again since the destination last
        # confirmed it applied everything (a mark echo). If the attempt fails they count as
        # dirty again: `have` says the destination holds the chunk, not which version. A
        # chunk sent only once needs no such care: if that frame was lost, `have` lacks it.
        self.sent = np.zeros(bm.nchunks, dtype=bool)
        self.unconfirmed = np.zeros(bm.nchunks, dtype=bool)

    def start_as(self, wire: int) -> Start:
        """Started (again) under wire id `wire`: its frames name that id."""
        self.wire = wire
        if self.planner.id != wire:
            self.planner = Planner(self.out.bitmap, wire, self.frame_payload)
        self.stage = Stage.STARTING
        o = self.out
        return Start(wire, o.node, o.name, o.bitmap.disk_size, o.bitmap.granularity,
                     o.bitmap.chunk_size, o.enabled, o.persistent, self.live, o.token)

    @property
    def size(self) -> int:
        return self.out.bitmap.serialized_size


class SourceSession:
    """Migrates `bitmaps` to `destination` (a name for reports: "HOST:PORT").

    Bitmaps complete in groups: each group is one frozen window (Freeze -> final chunks
    and completes -> acks), sized so its bytes (the live bitmaps' dirty bytes, whole small
    bitmaps) fit the downtime target at the measured rate. At most the destination's
    per-connection cap of bitmaps is in flight at once; more start as earlier ones are
    acknowledged, and past spec.MAX_BITMAPS starts the attempt goes on over a new
    connection."""

    def __init__(
        self,
        bitmaps: list[OutgoingBitmap],
        destination: str,
        opts: MigrationOptions | None = None,
        *,
        observer: FrameObserver | None = None,
        explain_early_failure: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self.opts = opts or MigrationOptions()
        self.bitmaps = bitmaps
        self.destination = destination
        self.observer = observer
        # Turns a failure before the destination's hello into a clearer error (TLS).
        self.explain = explain_early_failure or (lambda e: e)
        self.step = Step.IDLE
        self.phase = "setup"  # for reports: setup, bulk, dirty, completion, done
        self.attempt = 0
        self.pass_no = 0
        self.gate_open = not self.opts.wait_for_complete
        self.conn: Connection | None = None
        self.items: list[BitmapSend] = []
        self.result = MigrationResult(False, destination)
        self.final: dict[int, BitmapOutcome] = {}  # outcome of every bitmap, latest attempt
        self.finished = False
        self._delay = self.opts.retry_delay
        self._t0 = 0.0  # start of the attempt
        self._deadline: float | None = None
        self._waiting = ""
        self._seq = 0
        self._sync_t = 0.0
        self._sync_bytes = 0
        self._after_sync: Callable[[float], list[Action]] | None = None
        self._after_compute: Callable[[float], list[Action]] | None = None
        self._bulk: Iterator[tuple[BitmapSend, list[Frame]]] | None = None
        self._plan: list[tuple[BitmapSend, int, int]] = []
        self._plan_pos = 0
        self._keepalive = False
        self._in_pass = False  # the pending sync closes a dirty pass
        self._released = False  # the gate was opened by a call: freeze at the next chance
        self._limit = 0.0
        self._no_retry = False
        self._reset_attempt_state()

    def _reset_attempt_state(self) -> None:
        # Not started yet, in start order (live bitmaps first); and started, then refused
        # for a limit, to start again. Per-event work stays proportional to what is in
        # flight, not to the number of bitmaps.
        self._fresh: deque[BitmapSend] = deque()
        self._again: list[BitmapSend] = []
        self._flying: set[int] = set()  # ids in flight: starting, ready, live or frozen
        self._wire: dict[int, BitmapSend] = {}  # wire id -> bitmap, this attempt
        self._next_wire = 0
        self._conn_starts = 0  # start frames on the current connection
        self._window = defaults.MAX_BITMAPS_PER_CONNECTION  # bitmaps in flight at most
        self._acks = 0
        self._readied = 0
        self._backoff = False  # the timer ends a refused start's backoff
        self._more = False  # the end being exchanged closes a connection, not the attempt
        self._rotating = False  # connecting again within the attempt
        self._conn_bytes = 0  # bytes and frames of the attempt's earlier connections
        self._conn_frames: Counter[str] = Counter()
        # The frozen group.
        self._group: list[BitmapSend] = []
        self._frozen_ids: list[int] = []
        self._acks_due: set[int] = set()
        self._frozen_at = 0.0
        self._group_from = 0  # bytes sent when its window opened
        self._frozen_bytes = 0  # bytes sent inside frozen windows
        # Rates (bytes per second) for sizing windows. Dirty chunks move slower than whole
        # bitmaps (scattered, small frames), so each has its own figure.
        self._bw_dirty = 0.0  # the last dirty pass that carried enough to measure
        # Bitmap bytes per second of window, of the last groups of small bitmaps.
        self._group_rates: deque[float] = deque(maxlen=defaults.GROUP_HISTORY)
        self._last_group = 0  # bytes of the last group of small bitmaps
        self._pass_bytes = 0  # what the last dirty pass carried, and how long it took
        self._pass_s = math.inf

    # -- entry points ---------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin: the first attempt connects at once."""
        if not self.bitmaps:
            raise ValueError("no bitmaps to migrate")
        self.attempt = 1
        self.step = Step.CONNECTING
        return [Note("migration", {"destination": self.destination,
                                   "bitmaps": [b.key for b in self.bitmaps]}),
                Connect(now, 1)]

    def connected(self, now: float) -> list[Action]:
        """The connection of the current attempt is open (TLS done, if any)."""
        if self.step is not Step.CONNECTING:
            return []
        if not self._rotating:
            self._begin_attempt(now)
        self._rotating = False
        self._conn_starts = 0
        self._window = defaults.MAX_BITMAPS_PER_CONNECTION
        self.conn = Connection(Role.SOURCE, observer=self.observer)
        out = self._send([Hello(spec.PROTOCOL_VERSION, spec.MIN_PROTOCOL_VERSION,
                                Role.SOURCE, spec.CAPABILITIES, f"bitmig/{__version__}")])
        self.step = Step.HELLO
        return self._guard(now, lambda: [out, *self._wait(now, "the destination's hello",
                                                          self.opts.connect_timeout)])

    def connect_failed(self, now: float, exc: Exception) -> list[Action]:
        if self.step is not Step.CONNECTING:
            return []
        if not self._rotating:
            self._begin_attempt(now)
        self._rotating = False
        return self._end_attempt(now, self._describe(exc))

    def receive_data(self, now: float, data: bytes | bytearray | memoryview) -> list[Action]:
        """Bytes from the destination."""
        if self.conn is None or self.step in (Step.IDLE, Step.CONNECTING, Step.DONE):
            return []
        return self._guard(now, lambda: self._receive(now, data))

    def eof(self, now: float) -> list[Action]:
        """The destination closed its side."""
        if self.conn is None or self.step in (Step.IDLE, Step.CONNECTING, Step.DONE):
            return []
        return self._guard(now, lambda: self._eof(now))

    def connection_lost(self, now: float, exc: Exception) -> list[Action]:
        """The transport failed (reset, TLS error...)."""
        if self.conn is None or self.step in (Step.IDLE, Step.CONNECTING, Step.DONE):
            return []
        early = self.step is Step.HELLO
        return self._end_attempt(now, self._describe(self.explain(exc) if early else exc))

    def writable(self, now: float) -> list[Action]:
        """The transport can take more (answer to WantWrite)."""
        return self._guard(now, lambda: self._writable(now))

    def computed(self, now: float) -> list[Action]:
        """The jobs of the last Compute are done."""
        if self.step is not Step.REFRESH or self._after_compute is None:
            return []
        then, self._after_compute = self._after_compute, None
        return self._guard(now, lambda: then(now))

    def frozen(self, now: float) -> list[Action]:
        """The bitmaps named by Freeze are frozen: mutations wait."""
        if self.step is not Step.FREEZING:
            return []
        return self._guard(now, lambda: self._complete(now))

    def timer(self, now: float) -> list[Action]:
        if self.step is Step.IDLE and self._deadline is not None and not self.finished:
            if now < self._deadline:
                return [SetTimer(self._deadline)]
            self._deadline = None  # backoff over
            self.step = Step.CONNECTING
            return [Note("migration", {"destination": self.destination, "attempt": self.attempt,
                                       "bitmaps": [b.key for b in self.bitmaps
                                                   if not self.final[id(b)].ok]}),
                    Connect(now, self.attempt)]
        if self.step is Step.GATE and self._deadline is not None:
            if now < self._deadline:
                return [SetTimer(self._deadline)]
            self._deadline = None
            return self._guard(now, lambda: self._sync(now, self._after_keepalive,
                                                       keepalive=True))
        if self._deadline is None or self.conn is None:
            return []
        if now < self._deadline:
            return [SetTimer(self._deadline)]
        if self.step is Step.READY and self._backoff:  # a refused start may go again
            self._backoff = False
            self._deadline = None
            return self._guard(now, lambda: self._decide(now))
        return self._end_attempt(now, f"Timeout: timed out after {self._limit:g}s waiting "
                                      f"for {self._waiting}")

    def open_gate(self, now: float) -> list[Action]:
        """Freezing is allowed from now on (control `complete`, Daemon.release_freeze)."""
        if self.gate_open:
            return []
        self.gate_open = True
        self._released = True
        if self.step is Step.GATE:
            self._deadline = None
            return self._guard(now, lambda: self._decide(now))
        return []  # the next decision point freezes

    def abort(self, now: float, why: str = "the migration was stopped") -> list[Action]:
        """Stop now (the adapter was cancelled): end the attempt as failed, no retry. What
        was not acknowledged stays the source's, with unconfirmed chunks dirty again."""
        if self.finished:
            return []
        self._no_retry = True
        if self.step in (Step.IDLE, Step.CONNECTING):  # no connection open: nothing begun
            if not self._rotating:
                self._begin_attempt(now)
        return self._end_attempt(now, why)

    def bitmap_failed(self, now: float, ev: BitmapFailed) -> list[Action]:
        """This bitmap failed locally (connection check, delivery...): report and go on."""
        return self._guard(now, lambda: self._fail_local(now, ev.id, ev.code, ev.message))

    # -- views ----------------------------------------------------------------------------

    @property
    def greeted(self) -> bool:
        return self.step not in (Step.IDLE, Step.CONNECTING, Step.HELLO)

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def pending_bytes(self) -> int:
        return sum(it.planner.pending_bytes() for it in self._live())

    def progress(self, now: float, **extra: Any) -> Progress:
        return Progress({"phase": self.phase, "pass": self.pass_no,
                         "bytes_sent": self._bytes_sent(),
                         "pending_bytes": self.pending_bytes(),
                         "elapsed_s": now - self._t0, **extra})

    # -- plumbing -------------------------------------------------------------------------

    def _guard(self, now: float, fn: Callable[[], list[Action]]) -> list[Action]:
        """Run a step; a protocol fault or failed wait ends the attempt instead."""
        try:
            return fn()
        except RemoteProtocolError as e:
            # The destination broke the protocol: tell it (best effort), then give up.
            out: list[Action] = []
            if self.conn is not None:
                out.append(Send(self.conn.error_frame(e)))
            why = self.explain(e) if self.step is Step.HELLO else e
            return out + self._end_attempt(now, self._describe(why))
        except _AttemptFailed as e:
            return self._end_attempt(now, str(e))

    @staticmethod
    def _describe(e: Exception) -> str:
        return f"{type(e).__name__}: {e}"

    def _send(self, events: list[Event]) -> Send:
        assert self.conn is not None
        bufs: list[bytes | memoryview] = []
        for ev in events:
            bufs.extend(self.conn.send(ev))
        return Send(bufs)

    def _wait(self, now: float, what: str, limit: float) -> list[Action]:
        self._waiting, self._limit = what, limit
        self._deadline = now + limit
        return [SetTimer(self._deadline)]

    def _set_phase(self, now: float, phase: str, **extra: Any) -> list[Action]:
        self.phase = phase
        return [Note("phase", {"phase": phase, **extra}), self.progress(now, **extra)]

    def _bytes_sent(self) -> int:
        """Bytes sent in this attempt, over all its connections."""
        return self._conn_bytes + (self.conn.bytes_sent if self.conn is not None else 0)

    def _write(self, frames: list[Frame]) -> Send:
        """Frames of chunks: account what may now be older at the destination."""
        assert self.conn is not None
        bufs: list[bytes | memoryview] = []
        for f in frames:
            it = self._wire[f.id]
            if type(f) is Spans:
                span: slice | np.ndarray = spread(*decode_runs(f.runs))
                n = span.size
            else:
                span, n = slice(f.first, f.first + f.count), f.count
            it.unconfirmed[span] |= it.sent[span]
            it.sent[span] = True
            bufs.extend(self.conn.send(f))
            self.result.chunks_sent += n
            if type(f) is Zeroes:
                self.result.zero_runs += 1
        return Send(bufs)

    # -- an attempt -----------------------------------------------------------------------

    def _begin_attempt(self, now: float) -> None:
        todo = [b for b in self.bitmaps if not (self.final.get(id(b)) and
                                                self.final[id(b)].ok)]
        self.items = [BitmapSend(i, b, self.opts) for i, b in enumerate(todo)]
        self.result = MigrationResult(False, self.destination, self.attempt,
                                      bitmap_bytes=sum(b.bitmap.serialized_size for b in todo))
        self.pass_no = 0
        self.phase = "setup"
        self._t0 = now
        self._link = 0.0  # the link's rate as measured so far (bytes/s; 0: not yet)
        self._seq = 0
        self._reset_attempt_state()
        # Live bitmaps start first: their passes run while small ones complete in groups.
        self._fresh = deque(sorted(self.items, key=lambda it: not it.live))

    def _receive(self, now: float, data: bytes | bytearray | memoryview) -> list[Action]:
        assert self.conn is not None
        out: list[Action] = []
        # A fault in one bitmap's frame arrives as a BitmapFailed event, in order.
        for ev in self.conn.receive_data(data):
            out += self._on_event(now, ev)
            if self.step is Step.IDLE or self.step is Step.DONE or self._rotating:
                break  # the attempt (or this connection) ended
        return out

    def _eof(self, now: float) -> list[Action]:
        assert self.conn is not None
        self.conn.receive_eof()  # raises unless both ends said end
        return []

    def _on_event(self, now: float, ev: Any) -> list[Action]:
        t = type(ev)
        if t is Error:
            return self._on_error(now, ev)
        if t is BitmapFailed:
            return self._fail_local(now, ev.id, ev.code, ev.message)
        if t is Hello and self.step is Step.HELLO:
            return self._on_hello(now)
        if t is Ready and self.greeted and self.step is not Step.ENDING:
            return self._on_ready(now, ev)
        if t is Mark and self.step is Step.SYNC and ev.seq == self._seq:
            return self._on_mark(now)
        if t is Ack and self.step in (Step.DRAINING, Step.ACKS):
            return self._on_ack(now, ev)
        if t is End and self.step is Step.ENDING:
            return self._on_end(now)
        return []  # e.g. an old mark echo

    def _on_error(self, now: float, ev: Error) -> list[Action]:
        why = f"{ev.code}: {ev.message}"
        it = self._wire.get(ev.id) if ev.id is not None else None
        if it is None or not it.active or it.wire != ev.id:
            where = f" (bitmap id {ev.id})" if ev.id is not None else ""
            raise _AttemptFailed(f"PeerError: peer reported {ev.code}{where}: {ev.message}")
        if ev.code == ErrorCode.LIMIT and it.stage is Stage.STARTING:
            return self._requeue(now, it, why)
        return self._fail_item(now, it, why)

    def _requeue(self, now: float, it: BitmapSend, why: str) -> list[Action]:
        """The destination cannot hold this bitmap now (`limit` at start): not a failure of
        the bitmap. It starts again once another is acknowledged or after a backoff. A
        refusal while others are in flight is capacity that frees up as they finish;
        LIMIT_REFUSALS refusals with nothing else in flight fail the bitmap, with the
        destination's reason."""
        it.stage = Stage.QUEUED
        self._flying.discard(it.id)
        self._again.append(it)
        flight = self._in_flight()
        if not flight:
            it.refusals += 1
            if it.refusals >= defaults.LIMIT_REFUSALS:
                return self._fail_item(now, it, f"{why} (refused {it.refusals} times with "
                                                "nothing else in flight; giving up)")
        # Hold no more in flight than the destination just took (it grows again by one
        # per ack), so the next starts are not refused too.
        self._window = max(1, min(self._window, flight))
        it.again_after = self._acks
        it.again_at = now + min(self.opts.retry_delay * 2 ** max(0, it.refusals - 1),
                                self.opts.io_timeout / 4)
        out: list[Action] = [Note("requeued", {"bitmap": it.out.key, "refusals": it.refusals,
                                               "error": why})]
        return out + self._after_settled(now)

    def _fail_local(self, now: float, bid: int, code: str, message: str,
                    reported: bool = False) -> list[Action]:
        it = self._wire.get(bid)
        if it is None or not it.active or it.wire != bid:
            return []
        out: list[Action] = []
        if not reported and self.conn is not None:
            try:
                err = RemoteProtocolError(ErrorCode(code), message, bid)
            except ValueError:  # not a protocol code: report it as this side giving up
                err = RemoteProtocolError(ErrorCode.ABORTED, f"{code}: {message}", bid)
            out.append(Send(self.conn.error_frame(err)))
        return out + self._fail_item(now, it, f"{code}: {message}")

    def _fail_item(self, now: float, it: BitmapSend, why: str) -> list[Action]:
        it.active = False
        self._flying.discard(it.id)
        if it in self._again:
            self._again.remove(it)
        it.outcome.error = why
        out: list[Action] = [Note("bitmap_failed", {"bitmap": it.out.key, "error": why})]
        if it.id in self._acks_due:  # frozen: its held mutations apply
            out.append(Unfreeze([it.id]))
            self._acks_due.discard(it.id)
            if not self._acks_due:
                return out + self._group_done(now)
            return out
        return out + self._after_settled(now)

    def _after_settled(self, now: float) -> list[Action]:
        """A bitmap left the flight (refused or failed) outside a group: a slot is free."""
        if self.step is Step.READY:
            if not self._starting():
                return self._decide(now)
            return []
        if self.greeted and self.step is not Step.ENDING:
            return self._start_more(now)
        return []

    def _on_hello(self, now: float) -> list[Action]:
        self.step = Step.READY
        return self._decide(now)

    def _on_ready(self, now: float, ev: Ready) -> list[Action]:
        it = self._wire.get(ev.id)
        if it is None or not it.active or it.stage is not Stage.STARTING:
            return []
        it.stage = Stage.READY
        self._readied += 1
        out: list[Action] = []
        if ev.have is not None and it.live:
            try:
                out.append(self._resume(it, ev))
            except RemoteProtocolError as e:  # a mask that does not decode: that bitmap
                assert self.conn is not None
                out.append(Send(self.conn.error_frame(e)))
                return out + self._fail_item(now, it, f"{e.code}: {e.message}")
        if self.step is Step.READY and not self._starting():
            out += self._decide(now)
        return out

    def _resume(self, it: BitmapSend, ready: Ready) -> Note:
        """The destination kept chunks from an earlier attempt: send only what it lacks
        and what changed here since (the meta bitmap remembers that across attempts)."""
        bm = it.out.bitmap
        have = decode_have(ready.have_enc or 0, ready.have, bm.nchunks, it.wire)
        bm.meta.flags |= ~have
        it.sent |= have  # a resend of these may leave the destination with an older version
        it.resumed = True
        it.outcome.resumed_chunks = int(np.count_nonzero(have))
        return Note("resume", {"bitmap": it.out.key, "held_chunks": it.outcome.resumed_chunks,
                               "to_send": bm.meta.count()})

    # -- starting bitmaps -------------------------------------------------------------------

    def _in_flight(self) -> int:
        return len(self._flying)

    def _flight(self) -> list[BitmapSend]:
        """The bitmaps in flight, in the order given (so groups are deterministic)."""
        return [self.items[i] for i in sorted(self._flying)]

    def _starting(self) -> bool:
        return any(self.items[i].stage is Stage.STARTING for i in self._flying)

    def _start_more(self, now: float) -> list[Action]:
        """Start queued bitmaps while fewer than the window are in flight and this
        connection may carry more starts."""
        flight = self._in_flight()
        starts: list[Event] = []

        def room() -> bool:
            return flight < self._window and self._conn_starts < spec.MAX_BITMAPS
        for it in list(self._again):
            if not room():
                break
            if now < it.again_at and self._acks <= it.again_after:
                continue  # refused for a limit: not before its backoff or another ack
            self._again.remove(it)
            starts.append(self._start_one(it))
            flight += 1
        while self._fresh and room():
            it = self._fresh.popleft()
            if it.active:
                starts.append(self._start_one(it))
                flight += 1
        return [self._send(starts)] if starts else []

    def _start_one(self, it: BitmapSend) -> Start:
        wire, self._next_wire = self._next_wire, self._next_wire + 1
        self._wire[wire] = it
        self._flying.add(it.id)
        self._conn_starts += 1
        start = it.start_as(wire)
        assert self.conn is not None
        # Scattered chunks travel together if the peer takes spans; payloads are
        # compressed by the link's rate as measured so far.
        it.planner.spans = self.conn.peer_has(spec.CAP_SPANS)
        it.planner.link_rate = self._link
        return start

    def _live(self) -> list[BitmapSend]:
        return [it for it in self._flight() if it.live and it.stage is Stage.LIVE]

    def _want_write(self, now: float,
                    what: str = "the destination to take more data") -> list[Action]:
        return [WantWrite(), *self._wait(now, what, self.opts.io_timeout)]

    @staticmethod
    def _bulk_windows(items: list[BitmapSend]) -> Iterator[tuple[BitmapSend, list[Frame]]]:
        for it in items:
            for frames in it.planner.bulk():
                yield it, frames

    def _writable(self, now: float) -> list[Action]:
        if self.step is Step.BULK:
            return self._bulk_step(now)
        if self.step is Step.PASS:
            return self._pass_step(now)
        if self.step is Step.DRAINING:
            self.step = Step.ACKS
            return self._wait(now, "acknowledgements", self.opts.ack_timeout)
        return []

    def _begin_bulk(self, now: float, fresh: list[BitmapSend]) -> list[Action]:
        assert self.conn is not None
        for it in fresh:
            it.stage = Stage.LIVE
        self._sync_t, self._sync_bytes = now, self.conn.bytes_sent
        self.step = Step.BULK
        # A resumed bitmap's meta bitmap already names every chunk still to send.
        self._bulk = self._bulk_windows([it for it in fresh if not it.resumed])
        return [*self._set_phase(now, "bulk"), *self._want_write(now)]

    def _bulk_step(self, now: float) -> list[Action]:
        assert self._bulk is not None
        for it, frames in self._bulk:
            if not it.active:
                continue
            out = self._write(frames)
            # Hash what was just sent while it is in cache; the destination is slower
            # than this side, so the time is otherwise spent waiting for drain.
            cw = it.out.bitmap.chunk_words
            it.digests.refresh(frames[0].first * cw, (frames[-1].first + frames[-1].count) * cw)
            if not self._link:
                # The link's rate decides whether payloads are compressed: measure it on
                # this first window (sent raw) before the rest is queued in buffers. The
                # source waits for the echo doing nothing else: on a shared CPU (a demo,
                # a loaded host) work done meanwhile would slow the echo and pass for a
                # slow link.
                return [out, self.progress(now), *self._sync(now, self._resume_bulk)]
            return [out, self.progress(now), *self._want_write(now)]
        self._bulk = None
        return self._refresh(now, self._after_bulk)

    def _resume_bulk(self, now: float) -> list[Action]:
        self.step = Step.BULK
        return [Note("link", {"bytes_per_s": self._link}), *self._want_write(now)]

    def _refresh(self, now: float, then: Callable[[float], list[Action]]) -> list[Action]:
        """Bring digest leaves up to date off the session's thread (so the frozen window
        rehashes only the last changes), then go on with `then`."""
        self.step = Step.REFRESH
        self._deadline = None
        self._after_compute = then
        return [Compute([it.digests.refresh for it in self._live()])]

    def _after_bulk(self, now: float) -> list[Action]:
        def dirty(now: float) -> list[Action]:
            return [*self._set_phase(now, "dirty"), *self._decide(now)]
        return self._sync(now, dirty)

    def _sync(self, now: float, then: Callable[[float], list[Action]],
              keepalive: bool = False) -> list[Action]:
        """Send a mark; once echoed the destination has applied everything sent so far."""
        self._seq += 1
        self.step = Step.SYNC
        self._after_sync = then
        self._keepalive = keepalive
        return [self._send([Mark(self._seq)]),
                *self._wait(now, "the destination to catch up (mark echo)",
                            self.opts.io_timeout)]

    def _on_mark(self, now: float) -> list[Action]:
        assert self.conn is not None and self._after_sync is not None
        for it in self.items:
            it.unconfirmed[:] = False
        sent = self.conn.bytes_sent
        if not self._keepalive:
            # What went since the pass began, end to end (bytes merely queued in socket
            # buffers do not count as sent).
            carried, took = sent - self._sync_bytes, max(now - self._sync_t, 1e-6)
            # The link is at least as fast as the fastest stretch measured (small dirty
            # passes are dominated by the round trip); the planners compress by it.
            self._link = max(self._link, carried / took)
            for i in self._flying:
                self.items[i].planner.link_rate = self._link
            if self._in_pass:
                # A rate for the freeze decision only from enough bytes: a pass that
                # carried almost nothing measures the round trip, not the link.
                self._pass_bytes, self._pass_s = carried, took
                if carried >= defaults.MIN_RATE_BYTES:
                    self._bw_dirty = carried / took
        self._in_pass = False
        self._sync_t, self._sync_bytes = now, sent
        self._deadline = None
        then, self._after_sync = self._after_sync, None
        return then(now)

    # -- the convergence rule -------------------------------------------------------------

    def _decide(self, now: float) -> list[Action]:
        """The decision point, whenever nothing is on its way to the destination: start
        more bitmaps, then a bulk pass, a frozen group, a dirty pass, a wait, or the end."""
        self._backoff = False
        out = self._start_more(now)
        flight = self._flight()
        fresh = [it for it in flight if it.live and it.stage is Stage.READY]
        if fresh:
            return out + self._begin_bulk(now, fresh)
        live = self._live()
        small = [it for it in flight if not it.live and it.stage is Stage.READY]
        if live or small:
            return out + self._choose(now, live, small)
        self._deadline = None
        if self._starting():
            self.step = Step.READY
            return out + self._wait(now, "ready for the started bitmaps", self.opts.io_timeout)
        if (self._fresh or self._again) and self._conn_starts >= spec.MAX_BITMAPS:
            return out + self._end_connection(now, more=True)
        if self._again:  # each waits out a `limit` refusal: try again after the first backoff
            self.step = Step.READY
            self._backoff = True
            out += self._wait(now, "the destination to take more bitmaps", 0)
            self._deadline = min(it.again_at for it in self._again)
            return [*out, SetTimer(self._deadline)]
        if not self._readied:
            raise _AttemptFailed("ValueError: the destination refused every bitmap")
        return out + self._end_connection(now, more=False)

    def _choose(self, now: float, live: list[BitmapSend],
                small: list[BitmapSend]) -> list[Action]:
        """Freeze the live bitmaps once their dirty bytes fit the target (with small ones
        filling what is left of it), else a group of small ones, else a dirty pass."""
        pending = sum(it.planner.pending_bytes() for it in live)
        target = self.opts.downtime_ms / 1000
        if not self.gate_open:
            # Gate closed (live QEMU source): keep passing while anything is dirty; when
            # nothing is, mark now and then to keep the connection alive, until released.
            if pending > 0:
                return self._dirty_pass(now, pending)
            self.step = Step.GATE
            self._deadline = now + GATE_POLL
            return [SetTimer(self._deadline)]
        if live:
            fits = self._fits(pending, target)
            forced = not fits and not self._released and self.pass_no >= self.opts.max_passes
            if fits or forced or self._released:
                out: list[Action] = []
                if forced:
                    self.result.forced = True
                    out.append(Note("forced", {"passes": self.pass_no, "pending_bytes": pending}))
                room = target - self._dirty_time(pending) if fits else 0.0
                return out + self._freeze(now, live + self._fill(small, room, False))
            if not small:
                return self._dirty_pass(now, pending)
        # Small bitmaps do not wait for the live ones to converge: their groups go first.
        return self._freeze(now, self._fill(small, target, True))

    def _fits(self, pending: int, target: float) -> bool:
        """Whether the live bitmaps' dirty bytes can be sent within the target."""
        if pending == 0:
            return True
        if self._bw_dirty > 0 and pending / self._bw_dirty <= target:
            return True
        # No rate (the passes carried too little to measure one): what is left is no more
        # than the last pass carried, or too little to take more than a round trip, and
        # that pass, its round trip included, took no longer than the target.
        return (pending <= max(self._pass_bytes, defaults.MIN_RATE_BYTES)
                and self._pass_s <= target)

    def _dirty_time(self, pending: int) -> float:
        if pending == 0:
            return 0.0
        return pending / self._bw_dirty if self._bw_dirty > 0 else self._pass_s

    def _fill(self, small: list[BitmapSend], room: float, one: bool) -> list[BitmapSend]:
        """Small bitmaps whose bytes fit `room` seconds at the rate recent groups of small
        bitmaps achieved (at least one if `one`). Before any such group, the group is one
        bitmap: a probe that measures what a window really costs (the destination's
        commit of each bitmap included, which no bulk rate shows). A group carries at most
        GROUP_GROWTH times the bytes of the one before, so one optimistic measurement
        cannot overshoot the target far."""
        budget = 0.0
        if self._last_group:
            # The slowest of the last few groups, aiming below the target: window times
            # vary from group to group (a busy host, the destination's fsyncs).
            rate = min(self._group_rates)
            budget = min(max(0.0, room) * rate * defaults.GROUP_AIM,
                         defaults.GROUP_GROWTH * self._last_group)
        group: list[BitmapSend] = []
        size = 0
        for it in small:
            if size + it.size > budget and (group or not one):
                break
            group.append(it)
            size += it.size
        return group

    def _after_keepalive(self, now: float) -> list[Action]:
        return [self.progress(now), *self._decide(now)]

    def _dirty_pass(self, now: float, pending: int) -> list[Action]:
        assert self.conn is not None
        self.pass_no += 1
        self._in_pass = True
        self._sync_t, self._sync_bytes = now, self.conn.bytes_sent  # the pass's own rate
        self._plan = [(it, first, count) for it in self._live()
                      for first, count in it.planner.dirty_runs()]
        self._plan_pos = 0
        self.step = Step.PASS
        # Back from a group's completion: the passes go on.
        phase = self._set_phase(now, "dirty") if self.phase != "dirty" else []
        return [*phase, Note("pass", {"n": self.pass_no, "pending_bytes": pending,
                                      "chunks": len(self._plan), "bandwidth": self._bw_dirty}),
                *self._pass_step(now)]

    def _pass_step(self, now: float) -> list[Action]:
        # Runs are handed out in batches of about half a frame payload, so the adapter
        # checks its write buffer often enough to keep it bounded.
        budget = max(1, self.opts.frame_payload // PASS_BATCH_DIVISOR)
        bufs: list[bytes | memoryview] = []
        size = 0
        plan = self._plan
        while self._plan_pos < len(plan) and size < budget:
            # Consecutive runs of one bitmap go to its planner together (spans frames).
            it = plan[self._plan_pos][0]
            runs: list[tuple[int, int]] = []
            while self._plan_pos < len(plan) and plan[self._plan_pos][0] is it and \
                    size < budget:
                _, first, count = plan[self._plan_pos]
                self._plan_pos += 1
                runs.append((first, count))
                size += count * it.out.bitmap.chunk_size
            if it.active:
                bufs.extend(self._write(it.planner.take_runs(runs)).buffers)
        if bufs:
            return [Send(bufs), *self._want_write(now)]
        self._plan = []

        def synced(now: float) -> list[Action]:
            return [self.progress(now), *self._decide(now)]
        return self._refresh(now, lambda now: self._sync(now, synced))

    # -- completion, one group at a time ----------------------------------------------------

    def _freeze(self, now: float, group: list[BitmapSend]) -> list[Action]:
        self.step = Step.FREEZING
        self._deadline = None
        self._group = group
        self._frozen_ids = [it.id for it in group]
        return [Freeze(list(self._frozen_ids))]

    def _complete(self, now: float) -> list[Action]:
        assert self.conn is not None
        active = [it for it in self._group if it.active]
        self._group = active
        self._frozen_at = now
        self._group_from = self._bytes_sent()
        out: list[Action] = []
        gone = [i for i in self._frozen_ids if not self.items[i].active]
        if gone:  # failed while the freeze was being set up: their mutations apply
            out.append(Unfreeze(gone))
        if not active:
            self._frozen_ids = []
            return out + self._decide(now)
        self.result.groups += 1
        frozen_bytes = sum(it.planner.pending_bytes() if it.live else it.size for it in active)
        out += self._set_phase(now, "completion", pending_bytes=frozen_bytes,
                               group=self.result.groups, bitmaps=len(active))
        for it in active:
            frames = it.planner.take_dirty() if it.live else it.planner.take_all()
            out.append(self._write(frames))
            bm = it.out.bitmap
            digest = it.digests.digest()
            it.outcome.count = bm.count()
            it.outcome.digest = digest.hex()
            it.stage = Stage.FROZEN
            out.append(self._send([Complete(it.wire, digest, it.outcome.count)]))
        self._acks_due = {it.id for it in active}
        self.step = Step.DRAINING
        return out + self._want_write(now, "the destination to take the final chunks")

    def _on_ack(self, now: float, ev: Ack) -> list[Action]:
        it = self._wire.get(ev.id)
        if it is None or it.wire != ev.id or it.id not in self._acks_due:
            return []
        if ev.digest.hex() != it.outcome.digest:
            out: list[Action] = [self._send([Error(ErrorCode.DIGEST_MISMATCH,
                                                   "ack digest differs from the one sent",
                                                   it.wire)])]
            return out + self._fail_item(now, it, "destination acknowledged a different digest")
        # The acknowledgement is the handoff: from here the destination owns it.
        it.outcome.ok = True
        it.stage = Stage.DONE
        self._flying.discard(it.id)
        self._acks_due.discard(it.id)
        self._acks += 1
        self._window = min(defaults.MAX_BITMAPS_PER_CONNECTION, self._window + 1)
        out = [HandOff(it.id, self.destination),
               Note("handoff", {"bitmap": it.out.key, "owner": self.destination}),
               *self._start_more(now)]  # its slot at the destination is free
        if not self._acks_due:
            out += self._group_done(now)
        return out

    def _group_done(self, now: float) -> list[Action]:
        """Every bitmap of the group was acknowledged or failed: its window is closed."""
        window = now - self._frozen_at
        r = self.result
        # The bitmap released last was frozen for the whole window: the longest any was.
        r.downtime_ms = max(r.downtime_ms, window * 1000)
        r.frozen_total_ms += window * 1000
        carried = self._bytes_sent() - self._group_from
        self._frozen_bytes += carried
        whole = sum(it.size for it in self._group)
        if not any(it.live for it in self._group) and whole:
            # Bitmap bytes per second of window (frames, commit and acks included): the
            # rate, in the units _fill counts, that sizes the next group.
            self._group_rates.append(whole / max(window, 1e-6))
            self._last_group = whole
        note = Note("group", {"n": r.groups, "bitmaps": len(self._group), "bytes": carried,
                              "window_ms": window * 1000})
        self._group, self._frozen_ids = [], []
        return [note, self.progress(now), *self._decide(now)]

    def _end_connection(self, now: float, more: bool) -> list[Action]:
        """Send end: the attempt is over, or (`more`) this connection carried all the
        starts it may and the rest go on a new one."""
        self._more = more
        out: list[Action] = []
        if not more:
            out += self._set_phase(now, "done", downtime_ms=self.result.downtime_ms)
        self.step = Step.ENDING
        return [*out, self._send([End()]),
                *self._wait(now, "the destination's end", self.opts.io_timeout)]

    def _on_end(self, now: float) -> list[Action]:
        if self._more:
            assert self.conn is not None
            self._more = False
            self._conn_bytes += self.conn.bytes_sent
            self._conn_frames.update(self.conn.frames_sent)
            self.conn = None
            self._rotating = True
            self._deadline = None
            self.step = Step.CONNECTING
            left = len(self._fresh) + len(self._again)
            return [Close(), Note("next_connection", {"reason": f"{spec.MAX_BITMAPS} starts "
                                                                "on one connection",
                                                      "left": left}),
                    Connect(now, self.attempt)]
        self.result.ok = all(it.outcome.ok for it in self.items)
        # Every bitmap failed (e.g. each refused mid-stream): say so at the top, not only
        # per bitmap, so an operator sees why the attempt ended.
        every = not any(it.outcome.ok for it in self.items)
        return self._end_attempt(now, "ValueError: every bitmap of the attempt failed"
                                 if every else None)

    def _end_attempt(self, now: float, error: str | None) -> list[Action]:
        """Close the attempt: whatever was not acknowledged stays the source's, intact."""
        r = self.result
        if error is not None:
            r.ok = False
            r.error = error
        out: list[Action] = []
        # FREEZING too: the adapter may be about to freeze; it checks the step first.
        frozen = set(self._frozen_ids) if self.step in (
            Step.FREEZING, Step.DRAINING, Step.ACKS) else set()
        thaw = []
        for it in self.items:
            bm = it.out.bitmap
            bm.remove_tracker(it.digests.stale)  # one per attempt otherwise
            if not it.outcome.ok:
                bm.meta.flags |= it.unconfirmed
                if it.id in frozen and it.active:
                    thaw.append(it.id)
                if it.outcome.error is None:
                    it.outcome.error = r.error or "not acknowledged"
            self.final[id(it.out)] = it.outcome
        if thaw:
            out.append(Unfreeze(thaw))
        frames = Counter(self._conn_frames)
        if self.conn is not None:
            frames.update(self.conn.frames_sent)
        r.bytes_sent = self._bytes_sent()
        r.bytes_live = r.bytes_sent - self._frozen_bytes
        r.frames = dict(frames)
        r.bitmaps = [it.outcome for it in self.items]
        r.passes = self.pass_no
        r.duration_s = now - self._t0
        out.append(Close())
        self.conn = None
        self._deadline = None
        self._after_sync = self._after_compute = None
        self._bulk = None
        self._plan = []
        self._rotating = self._more = self._backoff = False
        self._group, self._frozen_ids, self._acks_due = [], [], set()
        left = [b for b in self.bitmaps if not self.final[id(b)].ok]
        if r.ok or not left or self._no_retry or self.attempt >= max(1, self.opts.retries):
            self.step = Step.DONE
            self.phase = "done" if r.ok else self.phase
            self.finished = True
            return [*out, AttemptDone(r, None), Finished(self._summary(r))]
        retry_at = now + self._delay
        self._delay *= 2
        self.attempt += 1
        self.step = Step.IDLE
        self._deadline = retry_at
        return [*out, AttemptDone(r, retry_at), SetTimer(retry_at)]

    def _summary(self, last: MigrationResult) -> MigrationResult:
        """The last attempt's result, listing every bitmap: those handed off in an earlier
        attempt keep that attempt's outcome."""
        if last.attempt == 1:
            return last
        merged = MigrationResult(**{f.name: getattr(last, f.name) for f in fields(last)})
        merged.bitmaps = [self.final[id(b)] for b in self.bitmaps]
        merged.bitmap_bytes = sum(b.bitmap.serialized_size for b in self.bitmaps)
        merged.ok = all(o.ok for o in merged.bitmaps)
        return merged
