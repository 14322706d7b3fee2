"""The destination session and its Intake, driven with a fake clock and no I/O: every
action is carried out by a fake that answers with the completion event."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from bitmig.core import defaults
from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.core.planner import Planner
from bitmig.protocol.events import (
    Ack,
    BitmapFailed,
    Complete,
    End,
    Error,
    Hello,
    Mark,
    Ready,
    Start,
    Zeroes,
)
from bitmig.protocol.spec import ErrorCode
from bitmig.session import destination as ds

TOKEN = b"t" * 16
DISK, GRAN, CHUNK = 1 << 36, 65536, 1024  # 128 KiB serialized, 128 chunks


@dataclass
class FakeStored:
    owned: dict[tuple[str, str], DirtyBitmap] = field(default_factory=dict)
    tokens: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def holds(self, node: str, name: str) -> bool:
        return (node, name) in self.owned

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        key = (start.node, start.name)
        if start.token is not None and self.tokens.get(key) == start.token:
            return self.owned[key]
        return None


class Driver:
    """One connection's session; carries out its actions at once, like a quick daemon."""

    def __init__(self, intake: ds.Intake, stored: FakeStored | None = None, *,
                 target: bool = False) -> None:
        self.intake = intake
        self.stored = stored or FakeStored()
        self.s = ds.DestinationSession(intake, self.stored, "peer", target=target)
        self.now = 0.0
        self.sent: list = []
        self.refused: dict[int, ErrorCode] = {}
        self.actions: list = []
        self.files: set[int] = SPOOLS  # temp files, host-wide (parked ones outlive us)
        self.syncs: list[ds.Sync] = []
        self.check: ds.TargetRefused | None = None  # what the target answers
        self.deliver: ds.TargetRefused | None = None
        self.fail_commit = False
        self.hold_commits = False  # commits run in the background until answered by hand
        self.held: list[ds.Commit] = []
        self.feed(Hello(1, 1, "source"))

    def feed(self, ev) -> None:
        self.run(self.s.handle(ev, self.now))

    def run(self, actions: list) -> None:
        for a in actions:
            self.actions.append(a)
            t, done = type(a), None
            if t is ds.Send:
                self.sent.append(a.event)
            elif t is ds.Refuse:
                self.refused[a.id] = a.code
            elif t is ds.Allocate:
                asm = Assembly(a.start)
                if a.base is not None:
                    asm.bitmap.deserialize(0, asm.bitmap.nchunks, a.base.words)
                    asm.received[:] = True
                done = ds.Allocated(a.id, asm)
            elif t is ds.OpenSpool:
                self.files.add(a.spool)
                done = ds.SpoolOpened(a.id)
            elif t is ds.ReopenSpool:
                assert a.spool in self.files
                done = ds.SpoolOpened(a.id)
            elif t is ds.DiscardSpool:
                self.files.discard(a.spool)
            elif t is ds.Sync:
                self.syncs.append(a)
            elif t is ds.Commit:
                if self.hold_commits:
                    self.files.discard(a.spool)  # the spool is the commit's now
                    self.held.append(a)
                elif self.fail_commit:
                    done = ds.StoreFailed(a.id, "disk full")
                else:
                    self.files.discard(a.spool)
                    done = ds.Stored(a.id, a.meta)
            elif t is ds.Check:
                done = self.check or ds.TargetOk(a.id)
            elif t is ds.Deliver:
                done = self.deliver or ds.TargetOk(a.id)
            elif t is ds.Own:
                self.stored.owned[(a.meta.node, a.meta.name)] = a.bitmap
                self.stored.tokens[(a.meta.node, a.meta.name)] = a.meta.token
            elif t is ds.Unstore:
                self.stored.owned.pop((a.node, a.name), None)
            if done is not None:
                if hasattr(done, "id"):
                    done.id = a.id
                self.feed(done)

    def close(self, cut: bool) -> None:
        self.run(self.s.close(self.now, cut))

    def of(self, kind: type) -> list:
        return [a for a in self.actions if type(a) is kind]


SPOOLS: set[int] = set()


@pytest.fixture(autouse=True)
def _files():
    SPOOLS.clear()


def source_bitmap(seed: int = 1) -> DirtyBitmap:
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    bm.fill_random(0.1, np.random.default_rng(seed))
    return bm


def start(bid: int = 0, name: str = "b", token: bytes | None = TOKEN, disk: int = DISK) -> Start:
    return Start(bid, "n", name, disk, GRAN, CHUNK, True, False, True, token)


def send_all(d: Driver, bid: int, bm: DirtyBitmap, chunks: slice | None = None) -> None:
    for f in Planner(bm, bid, 64 << 10).take_all():
        if chunks is None or chunks.start <= f.first < chunks.stop:
            d.feed(f)


def complete(bid: int, bm: DirtyBitmap) -> Complete:
    return Complete(bid, tree_digest(bm.words.data), bm.count())


def idle(intake: ds.Intake) -> bool:
    return (intake.budget_used == 0 and intake.held == 0 and not intake.reserved
            and not intake.parked and not SPOOLS)


def test_ack_returns_everything() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    bm = source_bitmap()
    d.feed(start())
    assert d.sent[-1] == Ready(0) and intake.budget_used == 128 << 10 and intake.held == 1
    send_all(d, 0, bm)
    d.feed(complete(0, bm))
    assert type(d.sent[-1]) is Ack and d.sent[-1].digest == tree_digest(bm.words.data)
    assert np.array_equal(d.stored.owned[("n", "b")].words, bm.words)
    assert idle(intake)
    d.feed(End())
    assert d.s.finished and d.sent[-1] == End()


def test_small_bitmaps_cost_the_minimum() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.feed(start(disk=8 * 8 * GRAN))  # 8 serialized bytes
    assert intake.budget_used == defaults.MIN_BITMAP_COST == 64 << 10


@pytest.mark.parametrize("outcome", ["aborted", "digest_mismatch", "bad_payload", "storage",
                                     "fatal", "cut_expiry", "incomplete"])
def test_budget_returns_to_zero(outcome: str) -> None:
    intake = ds.Intake(1 << 30, resume_timeout=300)
    d = Driver(intake)
    bm = source_bitmap()
    d.feed(start())
    send_all(d, 0, bm, slice(0, 64))
    assert intake.budget_used > 0
    if outcome == "aborted":
        d.feed(Error("aborted", "giving up", 0))
    elif outcome == "digest_mismatch":
        send_all(d, 0, bm, slice(64, 128))
        d.feed(Complete(0, bytes(32), bm.count()))
        assert d.refused[0] is ErrorCode.COUNT_MISMATCH or d.refused[0] is \
            ErrorCode.DIGEST_MISMATCH
    elif outcome == "incomplete":
        d.feed(complete(0, bm))
        assert d.refused[0] is ErrorCode.INCOMPLETE
    elif outcome == "bad_payload":
        d.feed(BitmapFailed(0, "bad_payload", "lies"))
        assert d.refused[0] is ErrorCode.BAD_PAYLOAD
    elif outcome == "storage":
        send_all(d, 0, bm, slice(64, 128))
        d.fail_commit = True
        d.feed(complete(0, bm))
        assert d.refused[0] is ErrorCode.STORAGE
        SPOOLS.clear()  # a failed commit removes its temp file itself
    elif outcome == "fatal":  # a violation found here: nothing is parked
        d.close(cut=False)
        assert not d.of(ds.CloseSpool) and not intake.parked
    elif outcome == "cut_expiry":
        d.now = 10.0
        d.close(cut=True)
        assert ("n", "b") in intake.parked and intake.budget_used > 0
        assert d.of(ds.CloseSpool)  # parked: its descriptor is closed
        assert intake.next_timer() == 310.0
        assert intake.handle_timer(309.9) == []
        acts = intake.handle_timer(310.0)
        for a in acts:
            if type(a) is ds.DiscardSpool:
                SPOOLS.discard(a.spool)
        assert intake.next_timer() is None
    d.close(cut=True)
    assert idle(intake), (intake.budget_used, intake.held, intake.reserved, SPOOLS)


def test_cut_resume_ack_releases_the_budget() -> None:
    """The issue-12 defect: a resumed bitmap's budget was never released after its ack,
    so after two resumes a fresh start within the budget got `limit`."""
    bm = source_bitmap()
    intake = ds.Intake(3 * (128 << 10))
    for _attempt in range(2):
        d = Driver(intake)
        d.feed(start())
        send_all(d, 0, bm, slice(0, 64))
        d.close(cut=True)
        d = Driver(intake)
        d.feed(start())
        ready = d.sent[-1]
        assert type(ready) is Ready and ready.have is not None  # resumed
        send_all(d, 0, bm, slice(64, 128))
        d.feed(complete(0, bm))
        assert type(d.sent[-1]) is Ack
        assert idle(intake), intake.budget_used
        d.stored.owned.clear()
    d = Driver(intake)
    for i in range(3):
        d.feed(start(i, f"fresh{i}"))
    assert not d.refused and d.sent[-3:] == [Ready(0), Ready(1), Ready(2)]


def test_resume_claim_rules() -> None:
    intake = ds.Intake(1 << 30)
    bm = source_bitmap()
    for other in (start(token=b"x" * 16), start(token=None),
                  Start(0, "n", "b", DISK * 2, GRAN, CHUNK, True, False, True, TOKEN)):
        d = Driver(intake)
        d.feed(start())
        send_all(d, 0, bm, slice(0, 64))
        d.close(cut=True)
        assert ("n", "b") in intake.parked
        d = Driver(intake)
        d.feed(other)  # another attempt: the parked chunks are discarded, a fresh start
        assert d.sent[-1] == Ready(0) and not intake.parked
        assert any(a.what == "discarded" for a in d.of(ds.Note))
        d.close(cut=False)
        assert idle(intake)


def test_lost_ack_replace() -> None:
    intake = ds.Intake(1 << 30)
    bm = source_bitmap()
    d = Driver(intake)
    d.feed(start())
    send_all(d, 0, bm)
    d.feed(complete(0, bm))  # stored and owned; say the ack is lost
    bm.set_bits(5, 6)  # the source keeps writing
    d2 = Driver(intake, d.stored)
    d2.feed(start())
    ready = d2.sent[-1]
    assert type(ready) is Ready and ready.have is not None  # every chunk held already
    assert d2.of(ds.OpenSpool)[0].initial is not None  # the spool starts as the old copy
    d2.feed(Planner(bm, 0, 64 << 10).take(0, 1)[0])
    d2.feed(complete(0, bm))
    assert type(d2.sent[-1]) is Ack and d2.of(ds.Own)[0].replace
    assert np.array_equal(d2.stored.owned[("n", "b")].words, bm.words)
    assert idle(intake)
    d3 = Driver(intake, d.stored)  # without the token it is a name clash
    d3.feed(start(token=b"y" * 16))
    assert d3.refused == {0: ErrorCode.EXISTS} and idle(intake)


def test_name_clash_with_a_bitmap_arriving() -> None:
    intake = ds.Intake(1 << 30)
    a, b = Driver(intake), Driver(intake)
    a.feed(start())
    b.feed(start())
    assert b.refused == {0: ErrorCode.EXISTS} and intake.held == 1


def test_caps() -> None:
    intake = ds.Intake(1 << 30, max_bitmaps=6, max_per_connection=4)
    d = Driver(intake)
    for i in range(5):
        d.feed(start(i, f"b{i}"))
    assert d.refused == {4: ErrorCode.LIMIT} and intake.held == 4
    d2 = Driver(intake)
    for i in range(3):
        d2.feed(start(i, f"c{i}"))
    assert d2.refused == {2: ErrorCode.LIMIT} and intake.held == 6
    d2.close(cut=False)
    # Parked bitmaps give way to new ones: they only spare a retry some work.
    d.close(cut=True)
    assert len(intake.parked) == 4 and not d.of(ds.DiscardSpool)
    d3 = Driver(intake)
    for i in range(4):
        d3.feed(start(i, f"d{i}"))
    assert not d3.refused and len(intake.parked) == 2 and intake.held == 6
    assert sum(a.what == "evicted" for a in d3.of(ds.Note)) == 2


def test_budget_limit_and_eviction() -> None:
    intake = ds.Intake(3 * (128 << 10))
    d = Driver(intake)
    for i in range(4):
        d.feed(start(i, f"b{i}"))
    assert d.refused == {3: ErrorCode.LIMIT}
    d.close(cut=True)  # three parked, the budget full
    d2 = Driver(intake)
    d2.feed(start(0, "x"))
    assert not d2.refused and intake.budget_used == 3 * (128 << 10)


def test_sync_completes_before_verify() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.s.sync_every = 1
    bm = source_bitmap()
    d.feed(start())
    send_all(d, 0, bm)
    assert len(d.syncs) == 1  # one at a time
    d.feed(complete(0, bm))
    assert not d.of(ds.Commit)  # waits for the sync
    d.feed(ds.Synced(0))
    assert d.of(ds.Commit) and type(d.sent[-1]) is Ack
    d.feed(Mark(3))
    assert d.sent[-1] == Mark(3)


@pytest.mark.parametrize("outcome", ["stored", "failed"])
@pytest.mark.parametrize("how", ["aborted", "bitmap_failed"])
def test_failed_while_its_commit_runs(outcome: str, how: str) -> None:
    """The adapter commits in the background (in groups), so frames arrive meanwhile: a
    bitmap the source aborts (or that fails) then is neither acked nor kept, and the
    session waits for the commit's outcome to forget it."""
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.hold_commits = True
    bm = source_bitmap()
    d.feed(start())
    send_all(d, 0, bm)
    d.feed(complete(0, bm))
    (c,) = d.held
    d.feed(Error("aborted", "giving up", 0) if how == "aborted" else
           BitmapFailed(0, "unexpected", "bits after complete"))
    assert not d.of(ds.DiscardSpool)  # the file is the running commit's
    refused = dict(d.refused)
    d.feed(ds.Stored(0, c.meta) if outcome == "stored" else ds.StoreFailed(0, "disk full"))
    assert not [e for e in d.sent if type(e) is Ack]
    assert ("n", "b") not in d.stored.owned
    assert d.refused == refused  # no second refusal for the same bitmap
    assert len(d.of(ds.Unstore)) == (outcome == "stored")  # no copy may stay
    assert idle(intake)


def test_mark_echo_waits_for_the_data_to_be_durable() -> None:
    """The echo of a mark comes once every spool's data before it is synced (the source
    freezes only after an echo, so the frozen window is left only later data); data
    written while a sync already ran is synced once more first."""
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.s.sync_every = 1
    bm = source_bitmap()
    d.feed(start(0, "a"))
    d.feed(start(1, "b"))
    send_all(d, 0, bm, slice(0, 64))  # starts a sync of a (one at a time)
    assert [s.id for s in d.syncs] == [0]
    send_all(d, 0, bm, slice(64, 128))  # written while that sync runs
    d.feed(Mark(7))
    assert [s.id for s in d.syncs] == [0, 1]  # b synced now; a's runs
    assert Mark(7) not in d.sent
    d.feed(ds.Synced(1))
    d.feed(ds.Synced(0))  # a: once more, for what came after its sync began
    assert [s.id for s in d.syncs] == [0, 1, 0] and Mark(7) not in d.sent
    d.feed(ds.Synced(0))
    assert d.sent[-1] == Mark(7)
    d.feed(Mark(8))  # nothing written since: the syncs are quick, the echo follows them
    assert d.sent[-1] != Mark(8)
    d.feed(ds.Synced(0))
    d.feed(ds.Synced(1))
    assert d.sent[-1] == Mark(8)


def test_mark_echo_when_the_bitmap_it_waits_for_fails() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.feed(start())
    d.feed(Mark(1))
    d.feed(Error("aborted", "giving up", 0))  # the sync's bitmap is gone
    assert d.sent[-1] == Mark(1)


def test_failed_sync_refuses_the_bitmap() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.feed(start())
    d.feed(Mark(1))
    assert d.of(ds.Sync)
    d.feed(ds.Synced(0, "cannot sync: EIO"))
    assert d.refused == {0: ErrorCode.STORAGE} and idle(intake)


def test_zeroes_on_fresh_chunks_write_nothing() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake)
    d.feed(start())
    d.feed(Zeroes(0, 0, 4))
    assert not d.of(ds.WriteRange)


def test_target_refuses_at_check() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake, target=True)
    d.check = ds.TargetRefused(0, ErrorCode.EXISTS, "node has a bitmap b")
    d.feed(start())
    assert d.refused == {0: ErrorCode.EXISTS} and not d.of(ds.Allocate) and idle(intake)


def test_target_refuses_at_deliver() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake, target=True)
    d.deliver = ds.TargetRefused(0, ErrorCode.STORAGE, "qemu-img failed")
    bm = source_bitmap()
    d.feed(start())
    send_all(d, 0, bm)
    d.feed(complete(0, bm))
    assert d.refused == {0: ErrorCode.STORAGE}
    assert d.of(ds.Unstore) and not d.of(ds.Own) and not any(type(e) is Ack for e in d.sent)
    assert idle(intake)


def test_target_takes_the_bitmap() -> None:
    intake = ds.Intake(1 << 30)
    d = Driver(intake, target=True)
    bm = source_bitmap()
    d.feed(start())
    assert d.of(ds.Check)[0].bitmap.name == "b"
    send_all(d, 0, bm)
    d.feed(complete(0, bm))
    kinds = [type(a) for a in d.actions]
    assert kinds.index(ds.Commit) < kinds.index(ds.Deliver) < kinds.index(ds.Own)
    assert np.array_equal(d.of(ds.Deliver)[0].data.words, bm.words)
    assert type(d.sent[-1]) is Ack and idle(intake)


def test_without_state_dir_nothing_is_spooled() -> None:
    intake = ds.Intake(1 << 30, durable=False)
    d = Driver(intake)
    bm = source_bitmap()
    d.feed(start())
    send_all(d, 0, bm)
    d.feed(complete(0, bm))
    assert not d.of(ds.OpenSpool) and not d.of(ds.WriteRange) and not d.of(ds.Commit)
    assert type(d.sent[-1]) is Ack and idle(intake)
