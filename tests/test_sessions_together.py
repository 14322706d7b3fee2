"""The source session against the real destination session, in memory, on a fake clock.

No sockets, no asyncio, no sleeps. `Link` carries out both sessions' actions: bytes from
the source's `Send` go through a destination `Connection` into a `DestinationSession`
(one per connection, sharing one `Intake` and one store, as a daemon does), and the
destination's frames go back to the source. Sending N bytes advances the clock by
N / RATE seconds; timers (the source's, and the intake's park expiry) fire when nothing
else is left to do, by moving the clock to the earliest one. `Compute` jobs run inline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.protocol import spec
from bitmig.protocol.codec import decode_body
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Ack, Bits, Error, Ready, Spans, Start, Zeroes
from bitmig.protocol.have import decode_have
from bitmig.protocol.runs import decode_runs
from bitmig.protocol.state import ConnState, Role
from bitmig.session import destination as ds
from bitmig.session import source as s
from bitmig.session.source import MigrationOptions, OutgoingBitmap, SourceSession

DISK, GRAN, CHUNK = 1 << 37, 65536, 1024  # 2 Mi bits, 256 KiB serialized, 256 chunks
RATE = 4 << 20  # bytes per second of the simulated link
RESUME = 300.0  # the destination's resume timeout (seconds)
OPTS = dict(small_threshold=0, frame_payload=16 << 10, downtime_ms=5, max_passes=10)


class Store:
    """What the destination host owns, across connections (a daemon's registry)."""

    def __init__(self) -> None:
        self.owned: dict[tuple[str, str], tuple[ds.StoredMeta, DirtyBitmap]] = {}
        self.owns = 0  # Own actions carried out
        self.replaced = 0

    def holds(self, node: str, name: str) -> bool:
        return (node, name) in self.owned

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        got = self.owned.get((start.node, start.name))
        if got is None or start.token is None or got[0].token != start.token:
            return None
        return got[1]


class DestEnd:
    """One connection's destination: a Connection and the real DestinationSession."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.conn = Connection(Role.DESTINATION)
        self.session = ds.DestinationSession(link.intake, link.store, "memory")
        self.closed = False
        self.frames_in = 0

    def feed(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as e:  # fatal: report it, discard the bitmaps
            self._out(self.conn.error_frame(e))
            self.close(cut=False)
            return
        for ev in events:
            if type(ev) is Error and ev.id is None:  # the source gave up: a cut
                self.close(cut=True)
                return
            self.run(self.session.handle(ev, self.link.now))

    def eof(self) -> None:
        try:
            self.conn.receive_eof()
        except ProtocolError:
            pass  # a cut: the close below parks what can be resumed
        self.close(cut=True)

    def close(self, cut: bool) -> None:
        if not self.closed:
            self.closed = True
            self.run(self.session.close(self.link.now, cut))

    def _out(self, buffers: list[bytes | memoryview]) -> None:
        self.link.to_source(b"".join(bytes(b) for b in buffers))

    def run(self, actions: list[ds.Action]) -> None:
        for a in actions:
            t, done = type(a), None
            if t is ds.Send:
                if type(a.event) is Ready:  # what the destination says it holds
                    self.link.readies[(len(self.link.dests), a.event.id)] = a.event
                if self.conn.state is not ConnState.FAILED:
                    self._out(self.conn.send(a.event))
            elif t is ds.Refuse:
                self.link.refused.append(a)
                self._out(self.conn.error_frame(RemoteProtocolError(a.code, a.message, a.id)))
            elif t is ds.Allocate:
                done = ds.Allocated(a.id, Assembly.replacing(a.start, a.base))
            elif t is ds.Own:
                store = self.link.store
                store.owns += 1
                store.replaced += a.replace
                store.owned[(a.meta.node, a.meta.name)] = (a.meta, a.bitmap)
            elif t is ds.Sync:
                done = ds.Synced(a.id)
            elif t is ds.CloseConnection:
                pass
            else:
                assert t is ds.Note, a  # durable=False: no spool, commit or target
            if done is not None:
                self.run(self.session.handle(done, self.link.now))


@dataclass
class Link:
    """Both sessions and what lies between them."""

    session: SourceSession
    intake: ds.Intake = field(default_factory=lambda: ds.Intake(
        1 << 30, durable=False, resume_timeout=RESUME))
    store: Store = field(default_factory=Store)
    now: float = 0.0
    rate: float = RATE  # bytes per second of this link
    writer: Callable[[Link, float], None] | None = None  # writes for dt seconds
    keep_writing: bool = False  # the writer goes on after handoffs (it skips those bitmaps)
    latency: float = 0.0  # seconds each batch of source bytes takes on top of N / RATE
    cut_at: int | None = None  # drop the connection after this many source frames
    drop_ack: bool = False  # the first ack is lost with its connection
    frames_up: int = 0  # source frames delivered, over the whole run
    dest: DestEnd | None = None
    timer: float | None = None
    queue: list[Callable[[float], list[s.Action]]] = field(default_factory=list)
    actions: list[s.Action] = field(default_factory=list)
    attempts: list[s.AttemptDone] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    freezes: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    handed_off: list[int] = field(default_factory=list)
    refused: list[ds.Refuse] = field(default_factory=list)
    dests: list[DestEnd] = field(default_factory=list)
    expired: list[ds.Note] = field(default_factory=list)
    readies: dict[tuple[int, int], Ready] = field(default_factory=dict)  # (conn, id)
    wire_chunks: dict[tuple[int, int], int] = field(default_factory=dict)  # (conn, id) -> n
    result: s.MigrationResult | None = None

    def run(self, limit: int = 100_000, until: Callable[[Link], bool] | None = None,
            ) -> s.MigrationResult | None:
        if not self.actions:
            self.do(self.session.start(self.now))
        for _ in range(limit):
            if self.result is not None or (until is not None and until(self)):
                return self.result
            if self.queue:
                self.do(self.queue.pop(0)(self.now))
                continue
            self.fire_timer()
        raise AssertionError("the sessions did not finish")

    def fire_timer(self, at: float | None = None) -> None:
        """Nothing to do: the clock moves to the earliest timer (or `at`), which fires."""
        parked = self.intake.next_timer()
        due = [t for t in (self.timer, parked, at) if t is not None]
        assert due, "both sessions wait for nothing: stuck"
        self.advance(min(due))
        if parked is not None and parked <= self.now:
            # durable=False: expiry only notes (no spool to discard)
            self.expired += [a for a in self.intake.handle_timer(self.now)
                             if type(a) is ds.Note]
        if self.timer is not None and self.timer <= self.now:
            self.timer = None
            self.do(self.session.timer(self.now))

    def do(self, actions: list[s.Action]) -> None:
        for a in actions:
            self.actions.append(a)
            t = type(a)
            if t is s.Connect:
                self.advance(a.at)
                self.dest = DestEnd(self)
                self.dests.append(self.dest)
                self.queue.append(self.session.connected)
            elif t is s.Send:
                data = b"".join(bytes(b) for b in a.buffers)
                for f in split(data):
                    ev = decode_body(f)
                    if type(ev) in (Bits, Zeroes, Spans):
                        k = (len(self.dests), ev.id)
                        n = ev.count if type(ev) is not Spans else int(
                            decode_runs(ev.runs)[1].sum())
                        self.wire_chunks[k] = self.wire_chunks.get(k, 0) + n
                self.to_dest(data)
            elif t is s.WantWrite:
                self.queue.append(self.session.writable)
            elif t is s.SetTimer:
                self.timer = a.at
            elif t is s.Compute:
                for job in a.jobs:
                    job()
                self.queue.append(self.session.computed)
            elif t is s.Freeze:
                assert not self.frozen
                self.frozen |= set(a.ids)
                self.freezes.append((self.now, tuple(a.ids)))
                self.queue.append(self.session.frozen)
            elif t is s.Unfreeze:
                self.frozen -= set(a.ids)
            elif t is s.HandOff:
                self.handed_off.append(a.id)
                self.frozen.discard(a.id)  # the adapter thaws it, owned by the destination
            elif t is s.Close:
                if self.dest is not None:
                    self.dest.eof()
                self.dest = None
                self.queue.clear()  # what the closed connection still carried is dropped
            elif t is s.AttemptDone:
                self.attempts.append(a)
                # Every frozen bitmap was thawed (Unfreeze) or handed off by now.
                assert not self.frozen, (self.frozen, a.result.error)
            elif t is s.Finished:
                self.result = a.result
                self.timer = None  # the adapter stops; only the intake's timer remains

    def to_dest(self, data: bytes) -> None:
        if self.dest is None:
            return
        self.advance(self.now + len(data) / self.rate + self.latency)
        pos = 0
        while pos < len(data):  # whole frames, one at a time, so a cut may fall anywhere
            if self.cut_at is not None and self.frames_up == self.cut_at:
                self.cut_at = None
                self.cut()
                return
            n = 4 + int.from_bytes(data[pos:pos + 4], "big")
            self.frames_up += 1
            self.dest.feed(data[pos:pos + n])
            pos += n
            if self.dest is None:
                return

    def advance(self, to: float) -> None:
        """A clock step: the guest writes for that long (not while its bitmaps are
        frozen, as a registry holds mutations, nor after a handoff)."""
        if to <= self.now:
            return
        if self.writer is not None and not self.frozen and (
                self.keep_writing or not self.handed_off):
            self.writer(self, to - self.now)
        self.now = to

    def to_source(self, data: bytes) -> None:
        if self.drop_ack and any(type(decode_body(f)) is Ack for f in split(data)):
            self.drop_ack = False
            self.cut()  # the ack is lost with the connection
            return
        self.queue.append(lambda now: self.session.receive_data(now, data))

    def cut(self) -> None:
        """The connection breaks: what is in flight is lost both ways."""
        dest, self.dest = self.dest, None
        self.queue.clear()
        if dest is not None:
            dest.close(cut=True)
        err = ConnectionResetError(104, "Connection reset by peer")
        self.queue.append(lambda now: self.session.connection_lost(now, err))

    def notes(self, kind: str) -> list[dict]:
        return [a.fields for a in self.actions if type(a) is s.Note and a.kind == kind]

    def assert_intake_empty(self) -> None:
        it = self.intake
        assert (it.budget_used, it.held, it.reserved, it.parked) == (0, 0, set(), {}), \
            (it.budget_used, it.held, it.reserved, it.parked)
        for d in self.dests:
            assert d.closed or d.session.finished, "a destination connection stayed open"
            assert d.session.bitmaps == {}


def split(data: bytes) -> list[bytes]:
    """Frame bodies of a byte string of whole frames."""
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def bitmap(seed: int, density: float = 0.1, disk: int = DISK) -> DirtyBitmap:
    bm = DirtyBitmap(disk, GRAN, CHUNK)
    bm.fill_random(density, np.random.default_rng(seed))
    return bm


def outgoing(name: str, bm: DirtyBitmap) -> OutgoingBitmap:
    return OutgoingBitmap("drive0", name, bm, name.encode().ljust(spec.TOKEN_BYTES, b"t"))


def link(*bms: tuple[str, DirtyBitmap], rate: float = RATE, **kw) -> Link:
    return Link(SourceSession([outgoing(n, b) for n, b in bms], "dest:1",
                              MigrationOptions(**{**OPTS, **kw})), rate=rate)


def digests(bm: DirtyBitmap) -> tuple[bytes, bytes]:
    return bm.sha256(), tree_digest(bm.serialize(0, bm.nchunks))


def assert_same(lk: Link, name: str, bm: DirtyBitmap) -> None:
    _meta, got = lk.store.owned[("drive0", name)]
    assert digests(got) == digests(bm), name
    assert np.array_equal(got.words, bm.words), name


class Writer:
    """A seeded guest writing `per_s` random bits per second of clock to some bitmaps;
    `written` is the reference model: every bit it set."""

    def __init__(self, seed: int, per_s: float, *bms: DirtyBitmap) -> None:
        self.rng = np.random.default_rng(seed)
        self.per_s, self.bms, self.acc = per_s, bms, 0.0
        self.written = [np.zeros(bm.nbits, bool) for bm in bms]

    def __call__(self, lk: Link, dt: float) -> None:
        self.acc += self.per_s * dt
        n, self.acc = int(self.acc), self.acc - int(self.acc)
        for bm, ref in zip(self.bms, self.written, strict=True):
            bits = self.rng.integers(0, bm.nbits, n)
            bm.set_many(bits)
            ref[bits] = True


def bits_of(bm: DirtyBitmap) -> np.ndarray:
    return np.unpackbits(bm.words.view(np.uint8), bitorder="little")[: bm.nbits].astype(bool)


# -- convergence and freeze ----------------------------------------------------------------

def test_mutated_bitmaps_converge_freeze_and_arrive_whole() -> None:
    a, b = bitmap(1), bitmap(2)
    initial = [bits_of(a), bits_of(b)]
    w = Writer(3, 1600, a, b)  # 2 x 1600 chunks/s dirtied vs 4096 chunks/s of link (spans
    # frames and compression on this slow link make a pass cheap: fewer writes converge at once)
    lk = link(("a", a), ("b", b))
    lk.writer = w
    result = lk.run()
    assert result.ok, result.error
    passes = lk.notes("pass")
    assert len(passes) >= 2 and not result.forced
    pending = [p["pending_bytes"] for p in passes]
    assert pending == sorted(pending, reverse=True) and pending[-1] < pending[0], pending
    # One freeze of both bitmaps, once what was left fit the 5 ms target.
    assert len(lk.freezes) == 1 and sorted(lk.freezes[0][1]) == [0, 1]
    completion = [p for p in lk.notes("phase") if p["phase"] == "completion"][-1]
    assert completion["pending_bytes"] / RATE <= 5 / 1000
    assert sum(w.written[0]) > 0 and sum(w.written[1]) > 0
    for name, bm, init, ref in (("a", a, initial[0], w.written[0]),
                                ("b", b, initial[1], w.written[1])):
        assert_same(lk, name, bm)
        got = bits_of(lk.store.owned[("drive0", name)][1])
        assert np.array_equal(got, init | ref), name  # every bit written, nothing else
    assert sorted(lk.handed_off) == [0, 1] and lk.store.owns == 2
    lk.assert_intake_empty()


def test_small_bitmaps_skip_the_live_phase() -> None:
    small = [bitmap(10 + i, disk=1 << 30) for i in range(3)]  # 2 KiB serialized each
    big = bitmap(20)
    lk = link(*[(f"s{i}", bm) for i, bm in enumerate(small)], ("big", big),
              small_threshold=64 << 10)
    result = lk.run()
    assert result.ok, result.error
    live = {o.name: o.live for o in result.bitmaps}
    assert live == {"s0": False, "s1": False, "s2": False, "big": True}
    # No chunk of a small bitmap goes out before the freeze.
    freeze = next(i for i, a in enumerate(lk.actions) if type(a) is s.Freeze)
    early = [decode_body(f) for a in lk.actions[:freeze] if type(a) is s.Send
             for f in split(b"".join(bytes(x) for x in a.buffers))]
    big_id = next(ev.id for ev in early if type(ev) is Start and ev.name == "big")
    assert {ev.id for ev in early if type(ev) in (Bits, Zeroes, Spans)} == {big_id}
    for i, bm in enumerate(small):
        assert_same(lk, f"s{i}", bm)
    assert_same(lk, "big", big)
    lk.assert_intake_empty()


def test_freeze_gate_holds_the_freeze_until_opened() -> None:
    bm = bitmap(30)
    lk = link(("b", bm), wait_for_complete=True)
    lk.writer = Writer(31, 200, bm)
    lk.run(until=lambda lk: lk.now > 2.0)  # converged long ago: the gate holds it live
    assert not lk.freezes and lk.result is None and lk.store.owned == {}
    assert len(lk.notes("pass")) >= 2
    opened = lk.now
    lk.do(lk.session.open_gate(lk.now))
    result = lk.run()
    assert result.ok, result.error
    assert len(lk.freezes) == 1 and lk.freezes[0][0] >= opened
    assert_same(lk, "b", bm)
    lk.assert_intake_empty()


# -- resume after a cut --------------------------------------------------------------------

def frames_of_a_run(per_s: float) -> int:
    a, b = bitmap(40), bitmap(41)
    lk = link(("a", a), ("b", b))
    lk.writer = Writer(42, per_s, a, b)
    assert lk.run().ok
    return lk.frames_up


@pytest.mark.parametrize("per_s", [0, 300], ids=["idle", "written"])
def test_resume_after_a_cut_at_every_frame_boundary(per_s: float) -> None:
    total = frames_of_a_run(per_s)
    assert total > 20
    resumed_some = 0
    for cut in range(total):
        a, b = bitmap(40), bitmap(41)
        initial = [bits_of(a), bits_of(b)]
        lk = link(("a", a), ("b", b), retries=2, retry_delay=1.0)
        lk.writer = w = Writer(42, per_s, a, b)  # the same writes as the uncut run
        lk.cut_at = cut
        result = lk.run()
        first = lk.attempts[0].result
        assert not first.ok and "Connection reset" in first.error, cut
        if all(o.ok for o in first.bitmaps):  # cut in the closing `end` exchange
            assert len(lk.attempts) == 1 and sorted(lk.handed_off) == [0, 1], cut
        else:
            assert result.ok, (cut, result.error)
            assert len(lk.attempts) == 2, cut
            retry = lk.attempts[1].result
            # What the destination said it held when the retry started (a resumed
            # bitmap's chunks, or all of a copy whose ack was lost)...
            held = {bid: int(decode_have(r.have_enc, r.have, a.nchunks, bid).sum())
                    for (c, bid), r in lk.readies.items() if c == 2 and r.have is not None}
            for o in retry.bitmaps:
                bm = a if o.name == "a" else b
                bid = next(it.id for it in lk.session.items if it.out.name == o.name)
                assert o.resumed_chunks == held.get(bid, 0), (cut, o.name)
                # ...and the retry sent no chunk it held, unless written since (the
                # writer only dirties chunks; without it nothing held is sent again).
                sent = lk.wire_chunks.get((2, bid), 0)
                if per_s == 0:
                    assert sent == bm.nchunks - held.get(bid, 0), (cut, o.name)
                resumed_some += held.get(bid, 0) > 0
            assert retry.chunks_sent == sum(v for (c, _), v in lk.wire_chunks.items()
                                            if c == 2), cut
        # Owned twice only when the ack was cut off in flight: the retry replaced it.
        assert sorted(lk.handed_off) == [0, 1] and len(lk.store.owned) == 2, cut
        assert lk.store.owns == 2 + lk.store.replaced, cut
        for name, bm, init, ref in (("a", a, initial[0], w.written[0]),
                                    ("b", b, initial[1], w.written[1])):
            assert_same(lk, name, bm)
            got = bits_of(lk.store.owned[("drive0", name)][1])
            assert np.array_equal(got, init | ref), (cut, name)
        lk.assert_intake_empty()
    assert resumed_some > total // 2  # most cuts fall mid-stream and resume


# -- lost ack ------------------------------------------------------------------------------

def test_lost_ack_is_resolved_by_the_retry_replacing_it() -> None:
    bm = bitmap(50)
    lk = link(("b", bm), retries=2, retry_delay=1.0)
    lk.drop_ack = True
    lk.run(until=lambda lk: bool(lk.attempts))
    first = lk.attempts[0].result
    assert not first.ok and not lk.handed_off and lk.store.owns == 1
    # Both sides hold it now; the source changes it before the retry.
    bm.set(1 << 30, GRAN)
    result = lk.run()
    assert result.ok, result.error
    assert lk.handed_off == [0] and lk.store.owns == 2 and lk.store.replaced == 1
    assert len(lk.store.owned) == 1  # one owner at the end: the destination, the latest copy
    assert_same(lk, "b", bm)
    lk.assert_intake_empty()


# -- the budget after every outcome --------------------------------------------------------

def test_budget_returns_to_zero_after_a_refused_bitmap() -> None:
    a, taken = bitmap(60), bitmap(61)
    lk = link(("a", a), ("taken", taken))
    other = bitmap(62)
    lk.store.owned[("drive0", "taken")] = (ds.StoredMeta(
        node="drive0", name="taken", disk_size=DISK, granularity=GRAN, chunk_size=CHUNK,
        enabled=True, persistent=False, count=other.count(), digest=b"", stored_at=0.0,
        origin="elsewhere", token=b"x" * spec.TOKEN_BYTES), other)
    result = lk.run()
    by = {o.name: o for o in result.bitmaps}
    assert by["a"].ok and not by["taken"].ok and "exists" in by["taken"].error
    assert [r.code for r in lk.refused] == [spec.ErrorCode.EXISTS]
    assert lk.store.owned[("drive0", "taken")][1] is other  # untouched
    assert_same(lk, "a", a)
    lk.assert_intake_empty()


def test_budget_returns_to_zero_after_a_bitmap_over_budget() -> None:
    a, b = bitmap(63), bitmap(64)
    lk = link(("a", a), ("b", b))
    lk.intake = ds.Intake(a.serialized_size + 1000, durable=False, resume_timeout=RESUME)
    result = lk.run()
    # b does not fit beside a: refused with `limit`, it is started again once a is
    # acknowledged (its budget released), and then fits.
    assert result.ok, result.error
    assert [r.code for r in lk.refused] == ["limit"]
    assert lk.notes("requeued")[0]["bitmap"] == "drive0/b"
    assert_same(lk, "a", a)
    assert_same(lk, "b", b)
    lk.assert_intake_empty()


def test_budget_returns_to_zero_after_a_fatal_error() -> None:
    bm = bitmap(65)
    lk = link(("b", bm), retries=1)
    lk.run(until=lambda lk: lk.frames_up >= 10)
    # A frame the destination cannot parse: a fatal error for the whole connection.
    lk.to_dest(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    result = lk.run()
    assert not result.ok and result.error == \
        "PeerError: peer reported malformed: frame body is not msgpack: "
    assert not lk.intake.parked  # this side's fatal error: nothing kept for a retry
    assert lk.store.owned == {} and not lk.handed_off
    assert lk.dests[0].closed
    lk.assert_intake_empty()


def test_budget_returns_to_zero_after_a_cut_and_expiry() -> None:
    bm = bitmap(66)
    lk = link(("b", bm), retries=1)
    lk.cut_at = 12
    result = lk.run()
    assert not result.ok and len(lk.attempts) == 1
    it = lk.intake
    assert list(it.parked) == [("drive0", "b")] and it.budget_used > 0 and it.held == 1
    cut_at = lk.now
    lk.fire_timer()  # nothing else to do: the clock moves to the expiry
    assert lk.now == pytest.approx(cut_at + RESUME)
    assert [n.what for n in lk.expired] == ["discarded"]
    lk.assert_intake_empty()


def test_budget_returns_to_zero_after_two_cuts_and_resumes() -> None:
    """Issue 9's defect: a resumed bitmap's budget was kept after its ack."""
    bm = bitmap(67)
    lk = link(("b", bm), retries=3, retry_delay=1.0)
    lk.cut_at = 12
    lk.run(until=lambda lk: len(lk.attempts) == 1)
    lk.cut_at = lk.frames_up + 4
    result = lk.run()
    assert result.ok and len(lk.attempts) == 3, result.error
    assert [o.resumed_chunks > 0 for o in lk.attempts[2].result.bitmaps] == [True]
    assert_same(lk, "b", bm)
    lk.assert_intake_empty()
    # A fresh start the full budget allows is admitted.
    assert lk.intake.admit(lk.intake.memory_budget, lk.now)[0] is None


def test_budget_returns_to_zero_after_a_lost_ack_and_replace() -> None:
    bm = bitmap(68)
    lk = link(("b", bm), retries=2, retry_delay=1.0)
    lk.drop_ack = True
    assert lk.run().ok
    assert lk.store.replaced == 1
    lk.assert_intake_empty()


def test_budget_returns_to_zero_after_an_abort_and_expiry() -> None:
    bm = bitmap(69)
    lk = link(("b", bm))
    lk.run(until=lambda lk: lk.frames_up >= 10)
    lk.do(lk.session.abort(lk.now))
    result = lk.run()
    assert not result.ok and result.error and "stopped" in result.error, result.error
    assert not lk.handed_off and lk.store.owned == {}
    # The source's fatal error frame is a cut to the destination: parked, then expired.
    assert list(lk.intake.parked) == [("drive0", "b")]
    lk.fire_timer()
    assert [n.what for n in lk.expired] == ["discarded"]
    lk.assert_intake_empty()


def test_resume_with_small_bitmaps_after_a_cut_at_every_frame_boundary() -> None:
    """Small bitmaps go out only after the freeze: a cut there must thaw and retry them."""
    def make() -> tuple[Link, list[DirtyBitmap]]:
        bms = [bitmap(70, disk=1 << 30), bitmap(71, disk=1 << 30), bitmap(72)]
        lk = link(("s0", bms[0]), ("s1", bms[1]), ("big", bms[2]), retries=2,
                  retry_delay=1.0, small_threshold=64 << 10)
        return lk, bms

    lk, _ = make()
    assert lk.run().ok
    total = lk.frames_up
    for cut in range(total):
        lk, bms = make()
        lk.cut_at = cut
        lk.run()
        # Each handed off once (HandOff ids index the attempt's own list: names here).
        assert sorted(n["bitmap"] for n in lk.notes("handoff")) == \
            ["drive0/big", "drive0/s0", "drive0/s1"], cut
        assert lk.store.owns == 3 + lk.store.replaced, cut
        for name, bm in zip(("s0", "s1", "big"), bms, strict=True):
            assert_same(lk, name, bm)
        lk.assert_intake_empty()


# -- spans frames and compression by link rate ---------------------------------------------

def sent_frames(lk: Link, after: int = 0) -> list:
    return [decode_body(f) for a in lk.actions[after:] if type(a) is s.Send
            for f in split(b"".join(bytes(x) for x in a.buffers))]


def test_scattered_dirty_chunks_travel_in_spans_frames() -> None:
    """A guest writing all over the bitmap dirties scattered chunks: the dirty passes and
    the completion carry them in a few spans frames, not one frame per chunk."""
    a = bitmap(11, density=0.1)
    initial = bits_of(a)
    w = Writer(12, 20000, a)
    lk = link(("a", a), frame_payload=64 << 10, max_passes=3)
    lk.writer = w
    result = lk.run()
    assert result.ok, result.error
    bulk_end = next(i for i, x in enumerate(lk.actions)
                    if type(x) is s.Note and x.kind == "phase" and x.fields["phase"] == "dirty")
    late = [f for f in sent_frames(lk, bulk_end) if type(f) in (Bits, Zeroes, Spans)]
    chunks = sum(int(decode_runs(f.runs)[1].sum()) if type(f) is Spans else f.count
                 for f in late)
    assert any(type(f) is Spans for f in late)
    assert chunks > 4 * len(late), (chunks, len(late))
    assert_same(lk, "a", a)
    assert np.array_equal(bits_of(a), w.written[0] | initial)


def test_a_destination_without_spans_gets_bits_frames(monkeypatch: pytest.MonkeyPatch,
                                                       ) -> None:
    """An older destination does not announce spans-v1: the source sends bits frames."""
    monkeypatch.setattr(ds.spec, "CAPABILITIES", ("encodings-v1", "tree-blake3"))
    a = bitmap(13, density=0.001)
    lk = link(("a", a), frame_payload=64 << 10)
    lk.writer = Writer(14, 3000, a)
    result = lk.run()
    assert result.ok, result.error
    kinds = {type(f) for f in sent_frames(lk)}
    assert Spans not in kinds and Bits in kinds
    assert_same(lk, "a", a)


def zlib_raw(frames: list) -> int:
    return sum(1 for f in frames if type(f) in (Bits, Spans)
               and f.enc == spec.Encoding.RAW | spec.Encoding.ZLIB)


def test_a_slow_link_gets_deflated_raw_payloads() -> None:
    """The first bulk window goes out raw, followed by a mark; once its echo measured a
    4 MiB/s link, mid-density windows are deflated."""
    a = bitmap(15, density=0.1)
    lk = link(("a", a), frame_payload=16 << 10)
    result = lk.run()
    assert result.ok, result.error
    frames = sent_frames(lk)
    data = [i for i, f in enumerate(frames) if type(f) is Bits]
    assert type(frames[data[0] + 1]) is spec_mark()
    assert frames[data[0]].enc == spec.Encoding.RAW  # not measured yet
    assert zlib_raw(frames) >= len(data) - 2
    assert result.bytes_sent < 0.7 * a.serialized_size
    assert_same(lk, "a", a)


def test_a_fast_link_gets_nothing_deflated_that_was_raw() -> None:
    a = bitmap(15, density=0.1)
    lk = link(("a", a), rate=2e9, frame_payload=16 << 10)
    result = lk.run()
    assert result.ok, result.error
    assert zlib_raw(sent_frames(lk)) == 0
    assert result.bytes_sent > a.serialized_size
    assert_same(lk, "a", a)


def spec_mark() -> type:
    from bitmig.protocol.events import Mark
    return Mark


# -- many bitmaps: groups, the in-flight window, refused starts, several connections -------

SMALL_DISK = 1 << 30  # 16 Ki bits: 2 KiB serialized, under every small_threshold here


class SpreadWriter(Writer):
    """Random writes spread over bitmaps, each until it is handed off (a registry refuses
    mutations of a bitmap the destination owns); `written` is the reference model."""

    def __call__(self, lk: Link, dt: float) -> None:
        self.acc += self.per_s * dt
        n, self.acc = int(self.acc), self.acc - int(self.acc)
        if not n:
            return
        gone = {id(lk.session.items[i].out.bitmap) for i in lk.handed_off}
        open_ = [k for k, bm in enumerate(self.bms) if id(bm) not in gone]
        for k in self.rng.choice(open_, n) if open_ else []:
            bit = self.rng.integers(0, self.bms[k].nbits, 1)
            self.bms[k].set_many(bit)
            self.written[k][bit] = True


def many(n: int, seed: int) -> list[tuple[str, DirtyBitmap]]:
    return [(f"s{i}", bitmap(seed + i, disk=SMALL_DISK)) for i in range(n)]


def assert_each_frozen_once(lk: Link, n: int) -> None:
    ids = [i for _t, group in lk.freezes for i in group]
    assert sorted(ids) == list(range(n)), "a bitmap frozen twice, or never"


def test_small_bitmaps_complete_in_groups_that_fit_the_target() -> None:
    bms = many(60, 100)
    init = [bits_of(bm) for _n, bm in bms]
    lk = link(*bms, small_threshold=1 << 20, downtime_ms=10)
    w = SpreadWriter(7, 2000, *[bm for _n, bm in bms])
    lk.writer, lk.keep_writing = w, True
    result = lk.run()
    assert result.ok, result.error
    groups = lk.notes("group")
    assert result.groups == len(groups) == len(lk.freezes) > 3
    # The first group is a probe of one bitmap; later ones grow to what fits the target.
    assert groups[0]["bitmaps"] == 1 and max(g["bitmaps"] for g in groups) > 4
    windows = [g["window_ms"] for g in groups]
    assert max(windows) <= 10 * 1.01, windows  # no window over the target
    assert result.downtime_ms == pytest.approx(max(windows))
    assert result.frozen_total_ms == pytest.approx(sum(windows))
    assert_each_frozen_once(lk, 60)
    assert sum(x.sum() for x in w.written) > 0
    for (name, bm), bits0, ref in zip(bms, init, w.written, strict=True):
        assert_same(lk, name, bm)
        got = bits_of(lk.store.owned[("drive0", name)][1])
        assert np.array_equal(got, bits0 | ref), name  # every bit written, nothing else
    lk.assert_intake_empty()


def test_more_than_1024_bitmaps_on_one_migration() -> None:
    n = spec.MAX_BITMAPS + 76
    bms = many(n, 1000)
    lk = link(*bms, small_threshold=1 << 20, downtime_ms=50)
    result = lk.run(limit=2_000_000)
    assert result.ok, result.error
    # Two connections in one attempt: the first carried all the starts it may.
    assert len(lk.dests) == 2 and len(lk.attempts) == 1
    starts = [d.conn.frames_received["start"] for d in lk.dests]
    assert starts == [spec.MAX_BITMAPS, 76]
    assert lk.refused == []  # never more in flight than the destination takes
    assert_each_frozen_once(lk, n)
    for name, bm in bms:
        assert_same(lk, name, bm)
    assert lk.store.owns == n
    lk.assert_intake_empty()


def test_starts_refused_for_a_limit_go_again_as_slots_free() -> None:
    bms = many(40, 2000)
    lk = link(*bms, small_threshold=1 << 20)
    lk.intake = ds.Intake(1 << 30, durable=False, resume_timeout=RESUME,
                          max_per_connection=6)
    result = lk.run()
    assert result.ok, result.error
    assert lk.refused and {r.code for r in lk.refused} == {"limit"}
    assert lk.notes("requeued") and len(lk.attempts) == 1
    assert_each_frozen_once(lk, 40)
    for name, bm in bms:
        assert_same(lk, name, bm)
    lk.assert_intake_empty()


def test_a_live_bitmap_with_little_left_and_small_ones_freezes_before_max_passes() -> None:
    # docs/operations.md used to show this running to --max-passes (forced): the small
    # bitmaps counted as pending, and passes that carried almost nothing measured a tiny
    # bandwidth. Now the small ones go in their own groups, and a rate is only taken from
    # a pass that carried enough.
    big = bitmap(3000)
    small = [(f"s{i}", bitmap(3100 + i, disk=1 << 34)) for i in range(4)]  # 32 KiB each
    lk = link(("big", big), *small, small_threshold=64 << 10, max_passes=30, downtime_ms=50)
    w = SpreadWriter(9, 1000, big)  # ~10 chunks dirty per pass, all along
    lk.writer, lk.keep_writing = w, True
    lk.latency = 0.005  # a pass of a few chunks then takes a round trip, not bytes / rate
    result = lk.run()
    assert result.ok, result.error
    assert not result.forced and result.passes < 30, result.passes
    assert_same(lk, "big", big)
    for name, bm in small:
        assert_same(lk, name, bm)
    lk.assert_intake_empty()
