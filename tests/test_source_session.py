"""The source session alone: a fake clock, no sockets, a scripted destination.

The destination here is a `Connection(Role.DESTINATION)` with one `Assembly` per bitmap:
it answers hello and ready (with `have` for a resumed bitmap), applies chunks, echoes
marks and acknowledges a complete whose digest matches what it rebuilt. The link is
simulated: sending N bytes advances the fake clock by N / LINK seconds, so the session's
bandwidth estimate and convergence rule meet a known, fixed rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from bitmig.core import defaults
from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol import spec
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import (
    Ack,
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
from bitmig.protocol.spec import ErrorCode, Role
from bitmig.session import source as s
from bitmig.session.source import (
    BitmapFailed,
    MigrationOptions,
    OptionsError,
    OutgoingBitmap,
    SourceSession,
    build_options,
)

DISK, GRAN, CHUNK = 1 << 37, 65536, 1024  # 256 KiB serialized, 256 chunks
LINK = 4 << 20  # bytes per second of the simulated link


class ScriptedDest:
    """A destination that keeps what a real one keeps across connections: bitmaps it
    acknowledged (stored) and, per token, the chunks of a bitmap whose connection dropped."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.refuse = refuse or {}  # bitmap name -> error code sent instead of ready
        self.conn = Connection(Role.DESTINATION)
        self.asm: dict[int, Assembly] = {}
        self.parked: dict[tuple[str, str], Assembly] = {}
        self.stored: dict[tuple[str, str], tuple[bytes | None, np.ndarray]] = {}
        self.errors: list[Error] = []
        self.marks = 0

    def connect(self) -> None:
        self.conn = Connection(Role.DESTINATION)
        self.asm = {}

    def cut(self) -> None:
        """The connection dropped: keep unfinished bitmaps for a retry with their token."""
        for asm in self.asm.values():
            st = asm.start
            if st.token is not None and (st.node, st.name) not in self.stored:
                self.parked[(st.node, st.name)] = asm
        self.asm = {}

    def feed(self, data: bytes) -> bytes:
        out: list[bytes | memoryview] = []
        for ev in self.conn.receive_data(data):
            t = type(ev)
            if t is Hello:
                out += self.conn.send(Hello(spec.PROTOCOL_VERSION, spec.MIN_PROTOCOL_VERSION,
                                            Role.DESTINATION, spec.CAPABILITIES))
            elif t is Start:
                out += self._start(ev)
            elif t in (Bits, Zeroes, Spans) and ev.id in self.asm:
                self.asm[ev.id].apply(ev)
            elif t is Mark:
                self.marks += 1
                out += self.conn.send(Mark(ev.seq))
            elif t is Complete and ev.id in self.asm:
                asm = self.asm.pop(ev.id)
                try:
                    digest = asm.verify(ev)
                except RemoteProtocolError as e:
                    out += self.conn.error_frame(e)
                    continue
                st = asm.start
                self.stored[(st.node, st.name)] = (st.token, asm.bitmap.words.copy())
                out += self.conn.send(Ack(ev.id, digest))
            elif t is Error:
                self.errors.append(ev)
                self.asm.pop(ev.id, None)
            elif t is End:
                out += self.conn.send(End())
        return b"".join(bytes(b) for b in out)

    def _start(self, st: Start) -> list[bytes | memoryview]:
        key = (st.node, st.name)
        if st.name in self.refuse:
            code = ErrorCode(self.refuse[st.name])
            return self.conn.error_frame(RemoteProtocolError(code, f"{st.name} refused", st.id))
        old = self.stored.get(key)
        if old is not None and old[0] != st.token:
            return self.conn.error_frame(
                RemoteProtocolError(ErrorCode.EXISTS, f"{st.name} already exists", st.id))
        parked = self.parked.pop(key, None)
        if parked is not None and parked.start.token == st.token:
            self.asm[st.id] = parked
            enc, data = encode_have(parked.received)
            return self.conn.send(Ready(st.id, data, enc))
        # A fresh start, or a retry after a lost ack (same token): rebuilt from scratch.
        self.asm[st.id] = Assembly(st)
        return self.conn.send(Ready(st.id))


@dataclass
class Harness:
    """Carries out a session's actions in memory, on a fake clock."""

    session: SourceSession
    dest: ScriptedDest
    now: float = 0.0
    # Called on every batch of bytes sent (mutations "while streaming").
    on_send: Callable[[Harness], None] | None = None
    before_freeze: Callable[[Harness], None] | None = None
    refuse_connects: int = 0  # the first N connects fail
    cut_after_frames: int | None = None  # drop the connection after this many frames
    drop_acks: bool = False  # the destination's acks never arrive (connection then cut)
    frames_up: int = 0
    timer: float | None = None
    queue: list[Callable[[float], list[s.Action]]] = field(default_factory=list)
    actions: list[s.Action] = field(default_factory=list)
    attempts: list[s.AttemptDone] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    handed_off: list[int] = field(default_factory=list)
    result: s.MigrationResult | None = None
    connected: bool = False

    def run(self, limit: int = 200_000) -> s.MigrationResult:
        self.do(self.session.start(self.now))
        for _ in range(limit):
            if self.result is not None:
                return self.result
            if self.queue:
                fn = self.queue.pop(0)
                self.do(fn(self.now))
                continue
            assert self.timer is not None, "the session waits for nothing: it is stuck"
            self.now = max(self.now, self.timer)
            self.timer = None
            self.do(self.session.timer(self.now))
        raise AssertionError("the session did not finish")

    def do(self, actions: list[s.Action]) -> None:
        for a in actions:
            self.actions.append(a)
            t = type(a)
            if t is s.Connect:
                self.now = max(self.now, a.at)
                self.connects.append(self.now)
                if self.refuse_connects > 0:
                    self.refuse_connects -= 1
                    err = ConnectionRefusedError(111, "Connection refused")
                    self.queue.append(lambda now, e=err: self.session.connect_failed(now, e))
                else:
                    self.dest.connect()
                    self.connected = True
                    self.frames_up = 0
                    self.queue.append(self.session.connected)
            elif t is s.Send:
                self._send(a.buffers)
            elif t is s.WantWrite:
                self.queue.append(self.session.writable)
            elif t is s.SetTimer:
                self.timer = a.at
            elif t is s.Compute:
                for job in a.jobs:
                    job()
                self.queue.append(self.session.computed)
            elif t is s.Freeze:
                if self.before_freeze:
                    self.before_freeze(self)
                self.frozen |= set(a.ids)
                self.queue.append(self.session.frozen)
            elif t is s.Unfreeze:
                self.frozen -= set(a.ids)
            elif t is s.HandOff:
                self.handed_off.append(a.id)
            elif t is s.Close:
                if self.connected:
                    self.dest.cut()
                self.connected = False
                self.queue.clear()  # events of the closed connection are dropped
            elif t is s.AttemptDone:
                self.attempts.append(a)
                self.frozen.clear()
            elif t is s.Finished:
                self.result = a.result

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        if not self.connected:
            return
        data = b"".join(bytes(b) for b in buffers)
        self.now += len(data) / LINK
        if self.cut_after_frames is not None:
            # Deliver whole frames up to the cut, then lose the connection.
            pos = 0
            while pos < len(data):
                if self.frames_up == self.cut_after_frames:
                    self.cut_after_frames = None
                    self._deliver(data[:pos])
                    self._lose()
                    return
                n = int.from_bytes(data[pos:pos + 4], "big")
                pos += 4 + n
                self.frames_up += 1
        self._deliver(data)
        if self.on_send and not self.frozen and not self.handed_off:
            self.on_send(self)  # a registry holds mutations while frozen; none after handoff

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        reply = self.dest.feed(data)
        if reply and self.drop_acks and any(type(f) is Ack for f in frames(reply)):
            self._lose()  # the ack is lost with the connection
            return
        if reply:
            self.queue.append(lambda now, r=reply: self.session.receive_data(now, r))

    def _lose(self) -> None:
        self.dest.cut()
        self.connected = False
        self.queue.clear()
        err = ConnectionResetError(104, "Connection reset by peer")
        self.queue.append(lambda now: self.session.connection_lost(now, err))

    def notes(self, kind: str) -> list[dict]:
        return [a.fields for a in self.actions if type(a) is s.Note and a.kind == kind]


def frames(data: bytes) -> list:
    from bitmig.protocol.codec import decode_body

    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append(decode_body(data[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def bitmap(seed: int, density: float = 0.1, disk: int = DISK) -> DirtyBitmap:
    bm = DirtyBitmap(disk, GRAN, CHUNK)
    bm.fill_random(density, np.random.default_rng(seed))
    return bm


def outgoing(name: str, bm: DirtyBitmap) -> OutgoingBitmap:
    return OutgoingBitmap("drive0", name, bm, name.encode().ljust(spec.TOKEN_BYTES, b"t"))


OPTS = dict(small_threshold=0, frame_payload=16 << 10, downtime_ms=5, max_passes=10)


def session(*bms: tuple[str, DirtyBitmap], **kw) -> SourceSession:
    return SourceSession([outgoing(n, b) for n, b in bms], "dest:1",
                         MigrationOptions(**{**OPTS, **kw}))


def held(dest: ScriptedDest, name: str) -> np.ndarray:
    return dest.stored[("drive0", name)][1]


# -- convergence ---------------------------------------------------------------------------

def test_dirty_passes_shrink_and_freeze_when_pending_fits_the_target() -> None:
    bm = bitmap(1)
    rng = np.random.default_rng(2)
    writes = [64]  # bits written per batch sent; halves at every pass

    def write(h: Harness) -> None:
        bm.set_many(rng.integers(0, bm.nbits, writes[0]))

    sess = session(("b", bm))
    h = Harness(sess, ScriptedDest(), on_send=write)
    orig_pass = sess._dirty_pass

    def dirty_pass(now: float, pending: int) -> list:
        writes[0] //= 2
        return orig_pass(now, pending)
    sess._dirty_pass = dirty_pass  # type: ignore[method-assign]
    result = h.run()
    assert result.ok, result.error
    passes = h.notes("pass")
    pending = [p["pending_bytes"] for p in passes]
    assert len(passes) >= 2 and pending == sorted(pending, reverse=True), pending
    assert pending[-1] < pending[0]
    assert not result.forced and result.passes == len(passes)
    # Froze because what was left fits the target at the measured (simulated) rate.
    freeze = next(i for i, a in enumerate(h.actions) if type(a) is s.Freeze)
    done_pass = [a for a in h.actions[:freeze] if type(a) is s.Note and a.kind == "pass"]
    assert done_pass[-1].fields["bandwidth"] == 0 or \
        done_pass[-1].fields["bandwidth"] == pytest.approx(LINK, rel=0.2)
    completion = h.notes("phase")[-2]
    assert completion["phase"] == "completion"
    assert completion["pending_bytes"] / LINK <= 5 / 1000
    assert np.array_equal(held(h.dest, "b"), bm.words)
    assert h.handed_off == [0] and result.bitmaps[0].ok


def test_forced_completion_at_max_passes() -> None:
    bm = bitmap(3)
    rng = np.random.default_rng(4)

    def write(h: Harness) -> None:  # never converges: every send dirties far more
        bm.set_many(rng.integers(0, bm.nbits, 400))
    h = Harness(session(("b", bm), max_passes=3, downtime_ms=0.001), ScriptedDest(),
                on_send=write)
    result = h.run()
    assert result.ok and result.forced and result.passes == 3
    assert h.notes("forced")[0]["passes"] == 3
    assert np.array_equal(held(h.dest, "b"), bm.words)


def test_small_bitmap_waits_for_completion() -> None:
    small, big = bitmap(5, disk=1 << 30), bitmap(6)
    h = Harness(session(("small", small), ("big", big), small_threshold=4096), ScriptedDest())
    result = h.run()
    assert result.ok
    assert [b.live for b in result.bitmaps] == [False, True]
    assert np.array_equal(held(h.dest, "small"), small.words)
    assert np.array_equal(held(h.dest, "big"), big.words)


# -- the freeze gate -----------------------------------------------------------------------

def test_freeze_gate_holds_until_released_and_hook_runs_before_freeze() -> None:
    bm = bitmap(7)
    sess = session(("b", bm), wait_for_complete=True)
    h = Harness(sess, ScriptedDest())
    hooked: list[float] = []

    def last_delta(h: Harness) -> None:  # e.g. QEMU's last writes, folded in at the freeze
        hooked.append(h.now)
        bm.set(0, 1 << 20)
    h.before_freeze = last_delta
    h.do(sess.start(h.now))
    # Run (bounded) until the session has kept the link alive at the gate for a while.
    for _ in range(10_000):
        if h.queue:
            h.do(h.queue.pop(0)(h.now))
        elif h.now > 1.0:
            break
        else:
            h.now = max(h.now, h.timer)
            h.timer = None
            h.do(sess.timer(h.now))
    assert sess.step is s.Step.GATE and not any(type(a) is s.Freeze for a in h.actions)
    assert h.dest.marks > 10  # keep-alive marks while waiting (no idle timeout there)
    assert not hooked and h.result is None
    h.do(sess.open_gate(h.now))
    result = h.run()
    assert result.ok and not result.forced and hooked
    assert np.array_equal(held(h.dest, "b"), bm.words)  # includes the hook's write
    assert bm.get(0)


def test_release_before_the_gate_freezes_at_the_next_decision() -> None:
    bm = bitmap(8)
    rng = np.random.default_rng(9)

    def write(h: Harness) -> None:
        bm.set_many(rng.integers(0, bm.nbits, 200))  # would never converge
        if h.session.pass_no == 2:
            h.do(h.session.open_gate(h.now))
    h = Harness(session(("b", bm), wait_for_complete=True, max_passes=1000), ScriptedDest(),
                on_send=write)
    result = h.run()
    assert result.ok and not result.forced and result.passes == 2
    assert np.array_equal(held(h.dest, "b"), bm.words)


# -- resume after a cut at every frame boundary ----------------------------------------------

def reference_frames() -> int:
    h = Harness(session(("a", bitmap(10)), ("b", bitmap(11))), ScriptedDest())
    assert h.run().ok
    return sum(h.dest.conn.frames_received.values())


def test_resume_after_a_cut_at_every_frame_boundary() -> None:
    total = reference_frames()
    assert total > 20
    for cut in range(total):
        a, b = bitmap(10), bitmap(11)
        before = {"a": a.words.copy(), "b": b.words.copy()}
        h = Harness(session(("a", a), ("b", b), retries=2, retry_delay=1.0), ScriptedDest(),
                    cut_after_frames=cut)
        result = h.run()
        first = h.attempts[0].result
        assert not first.ok and "Connection reset" in first.error
        for name, bm in (("a", a), ("b", b)):  # the source's bitmaps stayed intact
            assert np.array_equal(bm.words, before[name])
        if all(o.ok for o in first.bitmaps):
            # Cut after both acks, in the closing `end` exchange: everything was handed
            # off, so there is nothing to retry (the attempt still reports the cut).
            assert len(h.attempts) == 1 and h.handed_off == [0, 1] and not result.ok, cut
            continue
        assert result.ok, (cut, result.error)
        assert len(h.attempts) == 2, cut
        retry = h.attempts[1].result
        assert h.attempts[0].retry_at == pytest.approx(h.connects[1]) and \
            h.connects[1] - h.connects[0] >= 1.0
        for name in ("a", "b"):
            assert np.array_equal(held(h.dest, name), before[name]), (cut, name)
        # Each bitmap was handed off once, when acknowledged, in whichever attempt.
        assert sorted(o.name for r in (first, retry) for o in r.bitmaps if o.ok) == ["a", "b"]
        # The retry sent only what the destination lacked.
        for o in retry.bitmaps:
            n = (a if o.name == "a" else b).nchunks
            assert o.resumed_chunks <= n
        assert retry.chunks_sent == sum(
            (a if o.name == "a" else b).nchunks - o.resumed_chunks for o in retry.bitmaps), cut
        assert {o.name for o in result.bitmaps} == {"a", "b"}


def test_lost_ack_keeps_the_bitmap_and_the_retry_replaces_it() -> None:
    bm = bitmap(12)
    before = bm.words.copy()
    h = Harness(session(("b", bm), retries=2), ScriptedDest(), drop_acks=True)
    h.do(h.session.start(h.now))
    while not h.attempts:
        h.do(h.queue.pop(0)(h.now)) if h.queue else h.do(h.session.timer(h.timer or h.now))
    first = h.attempts[0].result
    assert not first.ok and not h.handed_off
    assert first.bitmaps[0].error and not first.bitmaps[0].ok
    assert np.array_equal(bm.words, before) and not h.frozen  # owned, thawed, intact
    h.drop_acks = False
    bm.set(1 << 30, 65536)  # changed between the attempts: the retry must carry it
    result = h.run()
    assert result.ok and h.handed_off == [0]
    assert np.array_equal(held(h.dest, "b"), bm.words)


# -- per-bitmap failure --------------------------------------------------------------------

def test_refused_bitmap_fails_alone() -> None:
    a, b = bitmap(13), bitmap(14)
    h = Harness(session(("a", a), ("taken", b)), ScriptedDest(refuse={"taken": "exists"}))
    result = h.run()
    assert not result.ok and result.error is None
    by = {o.name: o for o in result.bitmaps}
    assert by["a"].ok and by["taken"].error == "exists: taken refused"
    assert np.array_equal(held(h.dest, "a"), a.words) and ("drive0", "taken") not in \
        h.dest.stored
    assert h.handed_off == [0] and len(h.attempts) == 1


def test_every_bitmap_refused_ends_the_attempt() -> None:
    h = Harness(session(("x", bitmap(15))), ScriptedDest(refuse={"x": "exists"}))
    result = h.run()
    assert not result.ok and result.error == "ValueError: the destination refused every bitmap"
    assert result.bitmaps[0].error == "exists: x refused"


def test_a_start_refused_for_a_limit_is_tried_again_then_fails_clearly() -> None:
    # `limit` at start is the destination's capacity, not the bitmap's fault: the start
    # goes again after a backoff (new wire id each time); a destination that never takes
    # it ends the attempt with a clear error after defaults.LIMIT_REFUSALS tries.
    h = Harness(session(("x", bitmap(15)), retry_delay=0.5), ScriptedDest(refuse={"x": "limit"}))
    result = h.run()
    assert not result.ok and result.error == "ValueError: the destination refused every bitmap"
    n = defaults.LIMIT_REFUSALS
    assert result.bitmaps[0].error == \
        f"limit: x refused (refused {n} times with nothing else in flight; giving up)"
    assert h.dest.conn.frames_received["start"] == n and len(h.attempts) == 1
    assert h.now >= 0.5 + 1 + 2 + 4  # each try waits longer (doubling from retry_delay)


def test_a_ready_that_never_comes_after_a_refused_start_times_out() -> None:
    class RefusesOnceThenStalls(ScriptedDest):
        starts = 0

        def _start(self, st: Start) -> list[bytes | memoryview]:
            self.starts += 1
            if self.starts == 1:
                return self.conn.error_frame(RemoteProtocolError(ErrorCode.LIMIT, "full", st.id))
            return []  # the second start is never answered
    dest = RefusesOnceThenStalls()
    h = Harness(session(("x", bitmap(15)), retry_delay=0.5, io_timeout=3), dest)
    result = h.run()
    assert dest.starts == 2
    assert not result.ok and result.error == \
        "Timeout: timed out after 3s waiting for ready for the started bitmaps"


def test_last_bitmap_failing_mid_stream_ends_the_attempt_at_once() -> None:
    """The destination fails the only bitmap during the bulk pass (disk full): the attempt
    ends at the next decision, not after a wait for acks that cannot come."""
    class Full(ScriptedDest):
        def feed(self, data: bytes) -> bytes:
            reply = super().feed(data)
            if 0 in self.asm and any(type(f) is Bits for f in frames(data)):
                del self.asm[0]
                reply += b"".join(bytes(x) for x in self.conn.error_frame(
                    RemoteProtocolError(ErrorCode.STORAGE, "disk full", 0)))
            return reply
    h = Harness(session(("b", bitmap(22)), ack_timeout=600, io_timeout=600), Full())
    result = h.run()
    assert not result.ok and result.error == "ValueError: every bitmap of the attempt failed"
    assert result.bitmaps[0].error == "storage: disk full"
    assert not any(type(a) is s.Freeze for a in h.actions)  # nothing left to complete
    assert not h.frozen and not h.handed_off


def test_local_bitmap_failure_is_reported_and_the_rest_goes_on() -> None:
    a, b = bitmap(16), bitmap(17)
    sess = session(("a", a), ("b", b))

    def fail_b(h: Harness) -> None:
        if h.session.phase == "bulk" and not h.dest.errors:
            h.do(h.session.bitmap_failed(h.now, BitmapFailed(1, "storage", "disk full")))
    h = Harness(sess, ScriptedDest(), on_send=fail_b)
    result = h.run()
    by = {o.name: o for o in result.bitmaps}
    assert by["a"].ok and by["b"].error == "storage: disk full" and not result.ok
    assert [(e.code, e.id) for e in h.dest.errors] == [("storage", 1)]
    assert np.array_equal(held(h.dest, "a"), a.words)


def test_destination_error_for_a_bitmap_during_acks_unfreezes_it() -> None:
    a = bitmap(18)
    dest = ScriptedDest()
    real = dest.feed

    def feed(data: bytes) -> bytes:  # the destination fails the bitmap at complete
        if any(type(f) is Complete for f in frames(data)):
            out = real(data)
            return b"".join(bytes(x) for x in dest.conn.error_frame(
                RemoteProtocolError(ErrorCode.STORAGE, "fsync failed", 0))) if out else out
        return real(data)
    dest.feed = feed  # type: ignore[method-assign]
    h = Harness(session(("a", a)), dest)
    result = h.run()
    assert not result.ok and result.bitmaps[0].error == "storage: fsync failed"
    assert not h.frozen and not h.handed_off


# -- retries and backoff -------------------------------------------------------------------

def test_retries_back_off_as_the_session_decides() -> None:
    bm = bitmap(19)
    h = Harness(session(("b", bm), retries=4, retry_delay=0.5), ScriptedDest(),
                refuse_connects=3)
    result = h.run()
    assert result.ok and result.attempt == 4
    assert [round(t - h.connects[0], 6) for t in h.connects] == [0, 0.5, 1.5, 3.5]
    assert [a.result.error.startswith("ConnectionRefusedError") for a in h.attempts[:3]] == \
        [True] * 3
    assert [a.retry_at is None for a in h.attempts] == [False, False, False, True]


def test_retries_give_up_after_the_last_attempt() -> None:
    bm = bitmap(20)
    before = bm.words.copy()
    h = Harness(session(("b", bm), retries=2, retry_delay=1), ScriptedDest(),
                refuse_connects=5)
    result = h.run()
    assert not result.ok and len(h.attempts) == 2 and h.attempts[-1].retry_at is None
    assert result.bitmaps[0].error.startswith("ConnectionRefusedError")
    assert np.array_equal(bm.words, before)


def test_stalled_destination_times_out_on_the_fake_clock() -> None:
    class Mute(ScriptedDest):
        def feed(self, data: bytes) -> bytes:
            reply = super().feed(data)
            return b"" if any(type(f) is Mark for f in frames(data)) else reply
    h = Harness(session(("b", bitmap(21)), io_timeout=7), Mute())
    result = h.run()
    assert result.error == ("Timeout: timed out after 7s waiting for the destination to "
                            "catch up (mark echo)")


# -- options -------------------------------------------------------------------------------

def test_options_built_one_way_with_clear_errors() -> None:
    o = build_options({"small_threshold": "64K", "retries": 5, "downtime_ms": None})
    assert o.small_threshold == 65536 and o.retries == 5 and o.downtime_ms == 50
    base = MigrationOptions(max_passes=7)
    assert build_options({}, base).max_passes == 7
    for bad, msg in [({"max_passes": -1}, "'max_passes' must be a whole number in [0, 1000000]"),
                     ({"io_timeout": 0}, "'io_timeout' must be a number of seconds > 0"),
                     ({"retry_delay": "soon"}, "'retry_delay' must be a number in [0, 86400]"),
                     ({"downtime_ms": 1e9}, "'downtime_ms' must be a number in [0, 3600000]"),
                     ({"small_threshold": "lots"}, "'small_threshold': not a size"),
                     ({"wait_for_complete": "yes"}, "'wait_for_complete' must be true or false"),
                     ({"speed": 1}, "unknown migration option(s) speed")]:
        with pytest.raises(OptionsError) as err:
            build_options(bad)
        assert msg in str(err.value)


def test_abort_ends_the_attempt_and_re_flags_unconfirmed_chunks() -> None:
    bm = bitmap(22)
    rng = np.random.default_rng(23)
    sess = session(("b", bm), retries=5)
    h = Harness(sess, ScriptedDest(),
                on_send=lambda h: bm.set_many(rng.integers(0, bm.nbits, 50)))
    h.do(sess.start(h.now))
    while sess.pass_no < 2 or sess.step is not s.Step.PASS:  # inside the second dirty pass
        h.do(h.queue.pop(0)(h.now))
    resent = sess.items[0].unconfirmed.copy()
    assert resent.any()  # chunks sent twice since the last mark echo
    h.do(sess.abort(h.now))
    assert h.result is not None and not h.result.ok and len(h.attempts) == 1
    assert h.result.error == "the migration was stopped"
    assert bm.meta.flags[resent].all()  # dirty again: the destination may hold older copies
    assert len(bm._trackers) == 1  # the digest tracker of the attempt is gone (meta stays)
