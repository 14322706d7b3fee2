"""Live migration on loopback between two daemons, with workloads mutating the source."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bitmig.core.bitmap import DirtyBitmap
from bitmig.daemon.control import attach_control
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.registry import HandedOff, Ownership
from bitmig.daemon.service import Daemon
from bitmig.tools.workload import Workload


async def dest_daemon(tmp_path: Path, **kw) -> tuple[Daemon, int]:
    d = Daemon("destination", str(tmp_path / "dest"), **kw)
    _, port = await d.listen("127.0.0.1", 0)
    return d, port


def replay(initial: dict[str, np.ndarray], log: list, key: str, ref: DirtyBitmap) -> None:
    ref.words[:] = initial[key]
    for k, op, bits in log:
        if k == key:
            (ref.set_many if op == "set" else ref.reset_many)(bits)


@pytest.mark.parametrize("chunk", [1024, 64])
async def test_live_migration_under_writes_keeps_every_mutation(tmp_path: Path,
                                                                chunk: int) -> None:
    dest, port = await dest_daemon(tmp_path)
    src = Daemon("source", options=MigrationOptions(small_threshold=64 << 10,
                                                    frame_payload=256 << 10))
    rng = np.random.default_rng(5)
    e = src.registry.add("drive0", "b0", 1 << 40, 65536, chunk)  # 2 MiB bitmap
    e.bitmap.set_many(rng.integers(0, e.bitmap.nbits, e.bitmap.nbits // 10))
    initial = {e.key: e.bitmap.words.copy()}
    log: list = []
    wl = Workload([e], rate=50_000, reset_fraction=0.1, seed=2, log=log)
    wl.start()
    await asyncio.sleep(0.05)
    # Besides the timed workload, writes land between every window and pass.
    result = await src.migrate("127.0.0.1", port, progress=lambda p: wl.step(20))
    await wl.stop()
    assert result.ok, result.error
    assert e.state is Ownership.HANDED_OFF
    got = dest.registry.get("drive0", "b0").bitmap
    # The destination holds exactly what the source held at handoff...
    assert got.sha256().hex() == result.bitmaps[0].sha256
    assert np.array_equal(got.words, e.bitmap.words)
    # ...which is the initial bitmap plus every mutation the workload applied.
    ref = DirtyBitmap(1 << 40, 65536, chunk)
    replay(initial, log, e.key, ref)
    assert np.array_equal(ref.words, got.words)
    assert wl.writes > 0 and result.bitmaps[0].live
    # The stored copy survives a restart of the destination.
    await dest.close()
    again = Daemon("destination", str(tmp_path / "dest"))
    assert again.registry.get("drive0", "b0").bitmap.sha256() == got.sha256()


async def test_small_bitmap_skips_live_phase(tmp_path: Path) -> None:
    dest, port = await dest_daemon(tmp_path)
    src = Daemon("source")
    e = src.registry.add("n", "small", 1 << 30, 65536)  # 2 KiB: below the 1 MiB threshold
    e.bitmap.set(0, 1 << 29)
    result = await src.migrate("127.0.0.1", port)
    assert result.ok and not result.bitmaps[0].live
    assert result.passes == 0
    assert dest.registry.get("n", "small").bitmap.count() == e.bitmap.count() == 8192


async def test_workload_that_never_converges_is_forced_to_complete(tmp_path: Path) -> None:
    dest, port = await dest_daemon(tmp_path)
    opts = MigrationOptions(downtime_ms=0.0001, max_passes=3, small_threshold=0)
    src = Daemon("source", options=opts)
    e = src.registry.add("n", "busy", 1 << 40, 65536, 64)
    wl = Workload([e], rate=0, seed=1)
    # Writes land between every window and pass, so something is always dirty.
    result = await src.migrate("127.0.0.1", port, progress=lambda p: wl.step(500))
    assert wl.writes > 0
    assert result.ok and result.forced and result.passes == 3
    assert result.downtime_ms > 0
    assert dest.registry.get("n", "busy").bitmap.sha256().hex() == result.bitmaps[0].sha256


async def test_several_bitmaps_and_a_duplicate_name(tmp_path: Path) -> None:
    dest, port = await dest_daemon(tmp_path)
    dest.registry.add("n", "taken", 1 << 30, 65536)  # already owned there
    src = Daemon("source", options=MigrationOptions(small_threshold=4096))
    rng = np.random.default_rng(9)
    entries = []
    for name, disk in [("a", 1 << 40), ("b", 1 << 36), ("taken", 1 << 30), ("c", 1 << 41)]:
        e = src.registry.add("n", name, disk, 65536)
        e.bitmap.set_many(rng.integers(0, e.bitmap.nbits, 1000))
        entries.append(e)
    before = entries[2].bitmap.words.copy()
    result = await src.migrate("127.0.0.1", port)
    by = {b.name: b for b in result.bitmaps}
    assert not result.ok
    assert by["taken"].error.startswith("exists:") and "already exists" in by["taken"].error
    for name in "abc":
        assert by[name].ok
        assert dest.registry.get("n", name).bitmap.sha256().hex() == by[name].sha256
    taken = src.registry.get("n", "taken")
    assert taken.state is Ownership.OWNED and np.array_equal(taken.bitmap.words, before)
    assert {b.live for b in result.bitmaps} == {True, False}


async def test_mutations_after_handoff_name_the_new_owner(tmp_path: Path) -> None:
    _dest, port = await dest_daemon(tmp_path)
    src = Daemon("source")
    src.registry.add("n", "b", 1 << 30, 65536)
    result = await src.migrate("127.0.0.1", port)
    assert result.ok
    with pytest.raises(HandedOff, match=f"handed off to 127.0.0.1:{port}"):
        await src.registry.mutate("n", "b", "set", 0, 1)


async def test_failed_migration_keeps_the_source_bitmap_and_held_mutations(
        tmp_path: Path) -> None:
    # A destination that accepts the connection and then says nothing: the source times out.
    async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        w.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    src = Daemon("source", options=MigrationOptions(connect_timeout=0.3))
    e = src.registry.add("n", "b", 1 << 40, 65536)
    e.bitmap.set(0, 1 << 30)
    before = e.bitmap.words.copy()
    result = await src.migrate("127.0.0.1", port)
    assert not result.ok and "timed out after 0.3s waiting for the destination's hello" in \
        result.error
    assert e.state is Ownership.OWNED and np.array_equal(e.bitmap.words, before)
    server.close()

    # Mutations held during a freeze are applied in order when the migration fails.
    src.registry.freeze([e])
    t1 = asyncio.create_task(src.registry.mutate("n", "b", "set", 1 << 35, 1))
    t2 = asyncio.create_task(src.registry.mutate("n", "b", "reset", 1 << 35, 65536))
    await asyncio.sleep(0.01)
    assert not t1.done()
    src.registry.thaw(e, None)
    assert await t1 == 1 and await t2 == 1
    assert not e.bitmap.get((1 << 35) // 65536)


async def test_destination_refuses_when_state_dir_is_unwritable(tmp_path: Path) -> None:
    _dest, port = await dest_daemon(tmp_path)
    (tmp_path / "dest" / "bitmaps").chmod(0o500)
    try:
        src = Daemon("source")
        e = src.registry.add("n", "b", 1 << 30, 65536)
        e.bitmap.set(0, 1 << 20)
        result = await src.migrate("127.0.0.1", port)
    finally:
        (tmp_path / "dest" / "bitmaps").chmod(0o700)
    import os
    if os.geteuid() == 0:  # root writes anyway: the check is meaningful for other users only
        assert result.ok
        return
    assert not result.ok and "storage" in result.bitmaps[0].error
    assert e.state is Ownership.OWNED
    assert not list((tmp_path / "dest" / "bitmaps").iterdir())


async def test_source_state_dir_keeps_bitmap_and_token_across_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "src")
    src = Daemon("source", state, options=MigrationOptions(connect_timeout=0.5))
    e = src.registry.add("n", "b", 1 << 40, 65536)
    e.bitmap.set(0, 1 << 30)
    # A migration to nowhere fails: the source keeps the bitmap and its token.
    result = await src.migrate("127.0.0.1", 1)
    assert not result.ok and e.state is Ownership.OWNED and e.token is not None
    e.bitmap.set(1 << 35, 65536)
    words, token = e.bitmap.words.copy(), e.token
    await src.close()  # stores what it still owns
    again = Daemon("source", state)
    e2 = again.registry.get("n", "b")
    assert np.array_equal(e2.bitmap.words, words) and e2.token == token
    # Unchanged since: closing again writes nothing new, and the copy still loads.
    mtime = (again.store.path("n", "b")).stat().st_mtime_ns
    await again.close()
    assert again.store.path("n", "b").stat().st_mtime_ns == mtime


def test_start_without_token_discards_a_parked_bitmap() -> None:
    from bitmig.core.assembly import Assembly
    from bitmig.protocol.events import Start
    from bitmig.session.destination import DiscardSpool, Intake, Parked

    intake = Intake(1 << 30)
    st = Start(0, "n", "b", 1 << 36, 65536, 1024, True, False, True, b"t" * 16)
    assert intake.admit(4096, 0.0) == (None, [])
    intake.park(Parked(st, Assembly(st), 7, 4096, 300.0))
    p, acts = intake.claim(Start(1, "n", "b", 1 << 36, 65536, 1024, True, False, True), 1.0)
    assert p is None and DiscardSpool(7) in acts
    assert not intake.parked and not intake.reserved and intake.budget_used == 0
    assert intake.held == 0


async def test_bad_payload_fails_one_bitmap_not_the_connection(tmp_path: Path) -> None:
    """A payload that passes framing but does not decode fails only its bitmap."""
    from bitmig.daemon.channel import Channel
    from bitmig.daemon.trace_writer import Trace
    from bitmig.protocol import spec
    from bitmig.protocol.events import Bits, End, Error, Hello, Ready, Start
    from bitmig.protocol.state import Role

    dest, port = await dest_daemon(tmp_path)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    ch = Channel(r, w, Role.SOURCE, Trace(None, "source"), 5)
    await ch.send(Hello(1, 1, "source"))
    await ch.recv("hello")
    for i in (0, 1):
        await ch.send(Start(i, "n", f"b{i}", 1 << 36, 65536, 1024, True, False, True))
        assert type(await ch.recv("ready")) is Ready
    # POSITIONS payload naming a bit beyond the chunk: bad_payload for bitmap 0 only.
    await ch.send(Bits(0, 0, 1, int(spec.Encoding.POSITIONS), b"\xff\x7f"))
    from bitmig.protocol.errors import PeerError
    with pytest.raises(PeerError) as err:
        await ch.recv("the error")
    assert err.value.code == "bad_payload" and err.value.bitmap_id == 0
    await ch.send(Error("aborted", "giving up", 1))  # the connection still works
    await ch.send(End())
    assert type(await ch.recv("end")) is End
    await ch.close()
    assert dest.budget_used == 0 and not dest.reserved  # both bitmaps dropped, nothing kept


async def test_destination_migrates_a_received_bitmap_onward(tmp_path: Path) -> None:
    """A -> B -> C: B owns what it received (writes apply there), hands it on, and keeps no
    stored copy once C acknowledged; C holds A's bits plus B's write."""
    b = Daemon("destination", str(tmp_path / "b"))
    _, port_b = await b.listen("127.0.0.1", 0)
    c = Daemon("destination", str(tmp_path / "c"))
    _, port_c = await c.listen("127.0.0.1", 0)
    a = Daemon("source")
    e = a.registry.add("n", "x", 1 << 40, 65536)
    e.bitmap.fill_random(0.05, np.random.default_rng(8))
    # The reference model, built independently of B: A's bits plus B's write (16 clusters).
    ref = DirtyBitmap(1 << 40, 65536, 1024)
    ref.words[:] = e.bitmap.words
    newly_set = 16 - sum(ref.get(i) for i in range(16))
    assert newly_set > 0  # the write changes something, so it can be told apart
    ref.set(0, 1 << 20)
    assert (await a.migrate("127.0.0.1", port_b)).ok
    assert await b.registry.mutate("n", "x", "set", 0, 1 << 20) == newly_set  # a write at B
    onward = await b.migrate("127.0.0.1", port_c, [("n", "x")])
    assert onward.ok, onward.error
    assert not b.store.exists("n", "x")
    with pytest.raises(HandedOff, match=f"127.0.0.1:{port_c}"):
        await b.registry.mutate("n", "x", "set", 0, 1)
    assert np.array_equal(c.registry.get("n", "x").bitmap.words, ref.words)


@pytest.mark.parametrize("release", ["control", "python"])
async def test_wait_for_complete_freezes_only_once_released(tmp_path: Path,
                                                            release: str) -> None:
    from bitmig.daemon.control import acall
    from bitmig.daemon.registry import RegistryError

    dest, port = await dest_daemon(tmp_path)
    src = Daemon("source", options=MigrationOptions(small_threshold=0, wait_for_complete=True))
    sock = str(tmp_path / "src.sock")
    await attach_control(src, sock)
    e = src.registry.add("n", "g", 1 << 40, 65536)
    e.bitmap.fill_random(0.05, np.random.default_rng(3))
    at_gate = asyncio.Event()
    dirty_reports = []

    def progress(p: dict) -> None:
        dirty_reports.append(p["phase"] == "dirty")
        if sum(dirty_reports) >= 5:  # passes (keep-alive marks) go on while it waits
            at_gate.set()

    seen: list[Ownership] = []

    async def fold_last_delta() -> None:  # what a live QEMU source does before the freeze
        seen.append(e.state)
        await src.registry.mutate("n", "g", "set", 1 << 39, 65536)

    src.before_freeze.append(fold_last_delta)
    job = asyncio.create_task(src.migrate("127.0.0.1", port, progress=progress))
    await asyncio.wait_for(at_gate.wait(), 60)
    assert not job.done() and e.state is Ownership.MIGRATING and not seen
    if release == "control":
        assert await acall(sock, "complete") == {"released": True}
    else:
        assert src.release_freeze()
    result = await asyncio.wait_for(job, 60)
    assert result.ok, result.error
    assert seen == [Ownership.MIGRATING]  # the hook ran before the freeze
    got = dest.registry.get("n", "g").bitmap
    assert got.get((1 << 39) // 65536) and np.array_equal(got.words, e.bitmap.words)
    with pytest.raises(RegistryError, match="no migration is running"):
        await acall(sock, "complete")
    await src.close()


async def test_control_migrate_retries(tmp_path: Path) -> None:
    from bitmig.daemon.control import acall

    src = Daemon("source", options=MigrationOptions(connect_timeout=2))
    sock = str(tmp_path / "src.sock")
    await attach_control(src, sock)
    src.registry.add("n", "b", 1 << 30, 65536)
    # Nothing listens on port 1: every attempt is refused; control asks for three.
    r = await acall(sock, "migrate", host="127.0.0.1", port=1, retries=3, retry_delay=0.01)
    assert not r["ok"] and r["attempt"] == 3 and "ConnectionRefusedError" in r["error"]
    assert [m.attempt for m in src.migrations] == [1, 2, 3]
    with pytest.raises(Exception, match="'retries' must be a whole number in"):
        await acall(sock, "migrate", host="127.0.0.1", port=1, retries=-1)
    assert src.registry.get("n", "b").state is Ownership.OWNED
    await src.close()


@pytest.mark.parametrize("max_bitmaps", [None, 64])
async def test_more_bitmaps_than_the_destination_holds_at_once(tmp_path: Path,
                                                               max_bitmaps: int | None) -> None:
    # 300 small bitmaps: more than a destination holds for one connection (256), or in
    # all (64 here, so starts are refused with `limit` and go again). One migrate moves
    # them all in frozen groups under writes spread across them.
    dest, port = await dest_daemon(tmp_path, **({"max_bitmaps": max_bitmaps}
                                                if max_bitmaps else {}))
    src = Daemon("source")
    rng = np.random.default_rng(11)
    entries = []
    for i in range(300):
        e = src.registry.add(f"drive{i // 4}", f"b{i % 4}", 1 << 30, 65536)  # 2 KiB each
        e.bitmap.set_many(rng.integers(0, e.bitmap.nbits, 500))
        entries.append(e)
    initial = {e.key: e.bitmap.words.copy() for e in entries}
    log: list = []
    wl = Workload(entries, rate=20_000, seed=3, log=log)
    wl.start()
    result = await src.migrate("127.0.0.1", port, progress=lambda p: wl.step(50))
    await wl.stop()
    assert result.ok, result.error
    assert result.groups > 1 and result.downtime_ms <= result.frozen_total_ms
    assert wl.writes > 0
    for e, out in zip(entries, result.bitmaps, strict=True):
        assert e.state is Ownership.HANDED_OFF
        got = dest.registry.get(e.node, e.name).bitmap
        assert got.sha256().hex() == out.sha256 == e.bitmap.sha256().hex()
        ref = DirtyBitmap(1 << 30, 65536)
        replay(initial, log, e.key, ref)  # the initial bits plus every write, nothing else
        assert np.array_equal(ref.words, got.words), e.key


async def test_more_than_1024_bitmaps_in_one_migrate(tmp_path: Path) -> None:
    # Past spec.MAX_BITMAPS starts the source ends the connection and goes on over a new
    # one, in the same attempt: one migrate, every bitmap verified.
    dest, port = await dest_daemon(tmp_path)
    src = Daemon("source")
    rng = np.random.default_rng(12)
    entries = []
    for i in range(1100):
        e = src.registry.add(f"drive{i // 4}", f"b{i % 4}", 1 << 30, 65536)
        e.bitmap.set_many(rng.integers(0, e.bitmap.nbits, 100))
        entries.append(e)
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    assert result.attempt == 1 and result.frames["hello"] == 2 and result.frames["end"] == 2
    for e, out in zip(entries, result.bitmaps, strict=True):
        assert e.state is Ownership.HANDED_OFF
        assert dest.registry.get(e.node, e.name).bitmap.sha256().hex() == out.sha256 == \
            e.bitmap.sha256().hex()
