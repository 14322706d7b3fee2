"""Faults between source and destination: cut connections, slow and stalled peers, full
disks, a destination killed in each phase. The guarantee under test: the source owns its
bitmap, intact, until the destination has verified, durably stored and acknowledged it,
and the destination never holds a half bitmap that looks valid."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
from destproc import DestProcess
from faultproxy import FaultProxy
from wire import frames_of

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import TMP_MARK, Store
from bitmig.daemon.migration import MigrationOptions, MigrationResult
from bitmig.daemon.registry import Entry, Ownership
from bitmig.daemon.service import Daemon
from bitmig.protocol import spec
from bitmig.protocol.codec import encode_bytes
from bitmig.protocol.events import Hello, Ready, Start
from bitmig.protocol.spec import Kind
from bitmig.tools.workload import Workload

DISK, GRAN, CHUNK = 1 << 37, 65536, 1024  # 256 KiB serialized
OPTS = dict(small_threshold=0, frame_payload=32 << 10, downtime_ms=5, max_passes=4,
            io_timeout=5, connect_timeout=5, ack_timeout=5)


def replay(initial: np.ndarray, log: list, key: str) -> np.ndarray:
    ref = DirtyBitmap(DISK, GRAN, CHUNK)
    ref.words[:] = initial
    for k, op, bits in log:
        if k == key:
            (ref.set_many if op == "set" else ref.reset_many)(bits)
    return ref.words


@dataclass
class Run:
    entry: Entry
    result: MigrationResult
    initial: np.ndarray
    log: list

    def reference(self) -> np.ndarray:
        return replay(self.initial, self.log, self.entry.key)


def make_source(name: str, seed: int) -> tuple[Daemon, Entry]:
    src = Daemon("source", options=MigrationOptions(**OPTS))
    e = src.registry.add("drive0", name, DISK, GRAN, CHUNK)
    rng = np.random.default_rng(seed)
    e.bitmap.set_many(rng.integers(0, e.bitmap.nbits, e.bitmap.nbits // 8))
    return src, e


async def migrate_with_workload(src: Daemon, e: Entry, port: int, seed: int) -> Run:
    initial = e.bitmap.words.copy()
    log: list = []
    wl = Workload([e], rate=20_000, reset_fraction=0.1, seed=seed + 1000, log=log)
    wl.start()
    try:
        result = await src.migrate("127.0.0.1", port, progress=lambda p: wl.step(30))
    finally:
        await wl.stop()
    return Run(e, result, initial, log)


def _idle(dest: Daemon) -> bool:
    """No bitmap in flight: only bitmaps parked for a retry hold a name and budget."""
    parked = sum(p.cost for p in dest.partials.values())
    return dest.reserved == set(dest.partials) and dest.budget_used == parked


async def settle(dest: Daemon) -> None:
    """Wait until the destination has served every connection to its end (the bound
    only catches a hang); then it must have no bitmap in flight."""
    await asyncio.wait_for(dest.connections_closed(), 60)
    assert _idle(dest), "destination still busy"


def dest_holds(dest: Daemon, e: Entry) -> bool:
    return (e.node, e.name) in dest.registry.entries


def check_dest_files(state: Path, expect_digest: str | None, parked: int = 0) -> None:
    """The state directory holds no damaged file, at most the bitmap whose tree digest the
    source sent, and temp files only for bitmaps parked for a retry (never loaded)."""
    files = list((state / "bitmaps").iterdir())
    temps = [f for f in files if TMP_MARK in f.name]
    assert len(temps) == parked, f"temp files: {files}, parked: {parked}"
    good, bad = Store(state, clean=False).load_all()
    assert not bad, bad
    for meta, _bm in good:
        assert meta.digest.hex() == expect_digest


# -- connection cut at many offsets, both directions -------------------------------------

async def reference_stream(tmp_path: Path) -> tuple[int, int]:
    """Bytes each way of one fault-free migration through the proxy."""
    dest = Daemon("destination", str(tmp_path / "ref"))
    _, port = await dest.listen("127.0.0.1", 0)
    proxy = FaultProxy(port)
    await proxy.start()
    src, e = make_source("ref", 1)
    run = await migrate_with_workload(src, e, proxy.port, 1)
    assert run.result.ok, run.result.error
    await proxy.close()
    await dest.close()
    return proxy.forwarded["up"], proxy.forwarded["down"]


async def cut_once(tmp_path: Path, i: int, direction: str, offset: int) -> dict:
    state = tmp_path / f"d{i}"
    # The proxy resets both sides at a cut: no timeout is needed to see it, and a short
    # one would fail an honest attempt on a busy machine.
    dest = Daemon("destination", str(state), io_timeout=30)
    _, port = await dest.listen("127.0.0.1", 0)
    proxy = FaultProxy(port, cut_after=offset, direction=direction)
    await proxy.start()
    src, e = make_source(f"b{i}", 100 + i)
    run = await migrate_with_workload(src, e, proxy.port, 100 + i)
    await proxy.close()
    await settle(dest)
    out = run.result.bitmaps[0]
    # The source's bitmap is intact: every mutation the workload made is there.
    assert np.array_equal(e.bitmap.words, run.reference()), f"cut {direction}@{offset}"
    assert e.state in (Ownership.OWNED, Ownership.HANDED_OFF)
    held = dest_holds(dest, e)
    case = {"i": i, "dir": direction, "offset": offset, "cut": proxy.cut,
            "state": e.state.value, "dest_holds": held, "error": run.result.error}
    if e.state is Ownership.HANDED_OFF:
        # Handed off only on an ack: the destination owns the verified bitmap.
        assert out.ok and held
        got = dest.registry.get(e.node, e.name).bitmap
        assert got.sha256().hex() == out.sha256
        assert np.array_equal(got.words, e.bitmap.words)
        check_dest_files(state, out.digest)
    else:
        assert not out.ok and out.error
        case["parked"] = (e.node, e.name) in dest.partials
        if held:  # the ack was lost: stored there, still owned here until the retry
            assert dest.stored[(e.node, e.name)].digest.hex() == out.digest
            check_dest_files(state, out.digest)
        else:  # nothing valid there; a bitmap cut mid-stream is parked for the retry
            check_dest_files(state, None, parked=int(case["parked"]))
    # A retry without the fault completes: it resumes a parked bitmap, and it replaces a
    # copy whose ack was lost, so the bitmap ends with exactly one owner.
    if e.state is Ownership.OWNED:
        before = e.bitmap.words.copy()
        retry = await src.migrate("127.0.0.1", port)
        case["retry_ok"] = retry.ok
        case["retry_error"] = retry.bitmaps[0].error
        case["resumed_chunks"] = retry.bitmaps[0].resumed_chunks
        assert retry.ok, retry.error
        assert e.state is Ownership.HANDED_OFF
        got = dest.registry.get(e.node, e.name).bitmap
        assert np.array_equal(got.words, before)
        assert got.sha256().hex() == retry.bitmaps[0].sha256
        assert not dest.partials
        check_dest_files(state, retry.bitmaps[0].digest)
    await dest.close()
    return case


def offsets(total: int, n: int) -> list[int]:
    """n offsets spread over [1, total): dense near both ends, where the handshake and the
    completion are, and evenly in between."""
    edge = [1, 2, 4, 30, 60, 100, 200, total - 300, total - 150, total - 80, total - 40,
            total - 20, total - 5, total - 1]
    lin = np.linspace(1, total - 1, max(n - len(edge), 2)).astype(int).tolist()
    return sorted({o for o in edge + lin if 0 < o < total})[:n]


async def test_cut_connection_at_many_offsets(tmp_path: Path) -> None:
    up, down = await reference_stream(tmp_path)
    assert up > 256 << 10 and down > 0
    plan = [("up", o) for o in offsets(up, 20)] + [("down", o) for o in offsets(down, 12)]
    cases = []
    for i, (direction, off) in enumerate(plan):
        cases.append(await cut_once(tmp_path, i, direction, off))
    assert len(cases) >= 30
    double = [c for c in cases if c["state"] == "owned" and c["dest_holds"]]
    handed = [c for c in cases if c["state"] == "handed_off"]
    lost = [c for c in cases if c["state"] == "owned" and not c["dest_holds"]]
    resumed = [c for c in lost if c.get("resumed_chunks")]
    print(f"\n{len(cases)} cuts: {len(lost)} kept by the source ({len(resumed)} resumed "
          f"from parked chunks), {len(handed)} handed off, {len(double)} acks lost and "
          "replaced by the retry")
    assert lost and (handed or double)  # the sweep covered both sides of the commit
    assert resumed  # cuts mid-stream resume instead of starting over


async def test_lost_ack_leaves_a_single_owner(tmp_path: Path) -> None:
    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    # Cut the downstream in the middle of the ack frame, wherever it falls (the number of
    # passes, and so of mark echoes before it, varies from run to run).
    ack_head = msgpack.packb("kind") + msgpack.packb(int(Kind.ACK))

    def find_ack(direction: str, done: int, piece: bytes) -> None:
        at = piece.find(ack_head)
        if direction == "down" and at >= 0 and proxy.cut_after is None:
            proxy.cut_after = done + at + 10

    proxy = FaultProxy(port, direction="down", hook=find_ack)
    await proxy.start()
    src, e = make_source("lost-ack", 3)
    run = await migrate_with_workload(src, e, proxy.port, 3)
    await proxy.close()
    await settle(dest)
    assert proxy.cut and not run.result.ok
    # The source never saw the ack: it stays the owner (mutations keep applying there);
    # the destination's stored copy carries the migration's token.
    assert e.state is Ownership.OWNED and dest_holds(dest, e)
    e.bitmap.set(0, 1 << 20)  # a write after the failed attempt
    before = e.bitmap.words.copy()
    # The retry with the same token replaces that copy: one owner, the latest bits.
    retry = await src.migrate("127.0.0.1", port)
    assert retry.ok, retry.error
    assert e.state is Ownership.HANDED_OFF
    got = dest.registry.get(e.node, e.name).bitmap
    assert np.array_equal(got.words, before)
    assert retry.bitmaps[0].resumed_chunks == got.nchunks  # nothing resent needlessly
    files = sorted(p.name for p in (dest.store.dir).iterdir())
    assert len(files) == 1 and ".tmp-" not in files[0], files


# -- slow destination ------------------------------------------------------------------

async def test_slow_destination_bounded_source_memory(tmp_path: Path) -> None:
    from bitmig.daemon.migration import WRITE_BUFFER_HIGH

    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    proxy = FaultProxy(port, up_rate=24 << 20, read_size=16 << 10)  # 24 MiB/s
    await proxy.start()
    opts = MigrationOptions(small_threshold=0, frame_payload=1 << 20, io_timeout=10)
    src = Daemon("source", options=opts)
    e = src.registry.add("n", "big", 1 << 43, 65536, 4096)  # 16 MiB serialized
    rng = np.random.default_rng(1)
    e.bitmap.fill_random(0.3, rng)  # mid density: raw frames
    peak = 0
    samples = 0

    async def watch() -> None:
        nonlocal peak, samples
        for _ in range(3000):  # bounded: 3000 * 5 ms
            m = src.active_migration
            writer = m.writer if m else None
            if writer is not None and writer.transport is not None:
                peak = max(peak, writer.transport.get_write_buffer_size())
                samples += 1
            await asyncio.sleep(0.005)

    w = asyncio.create_task(watch())
    t0 = time.monotonic()
    result = await asyncio.wait_for(src.migrate("127.0.0.1", proxy.port), 30)
    dt = time.monotonic() - t0
    w.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await w
    await proxy.close()
    assert result.ok, result.error
    assert dt > 0.4  # the throttle really slowed it down
    assert samples > 20
    bound = WRITE_BUFFER_HIGH + 2 * opts.frame_payload + (256 << 10)
    print(f"\nslow destination: {dt:.2f}s, peak transport buffer {peak / 2**20:.2f} MiB, "
          f"bound {bound / 2**20:.2f} MiB")
    assert 0 < peak <= bound
    assert dest.registry.get("n", "big").bitmap.sha256().hex() == result.bitmaps[0].sha256


# -- stalled peers ---------------------------------------------------------------------



async def _fake_dest(stall_after: str,
                     problems: list[BaseException]) -> tuple[asyncio.AbstractServer, int]:
    """A destination that stalls. Its own failures go to `problems`, for the test to
    raise: swallowed, they would show as the source's timeout, the outcome under test."""
    hello = encode_bytes(Hello(1, 1, "destination", spec.CAPABILITIES))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await serve(r, w)
        except ConnectionError:
            pass  # the source gave up and closed: expected
        except Exception as e:
            problems.append(e)
        w.close()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = b""
        greeted = said_ready = False
        for _ in range(10_000):
            data = await asyncio.wait_for(r.read(1 << 16), 10)
            if not data:
                break
            buf += data
            if said_ready:  # swallow the stream, answer nothing (no mark echo)
                continue
            frames = frames_of(buf)
            if not greeted and any(type(f) is Hello for f in frames):
                w.write(hello)
                greeted = True
                if stall_after == "hello":
                    said_ready = True  # and then silence
                continue
            starts = [f for f in frames if type(f) is Start]
            if starts:
                w.write(b"".join(encode_bytes(Ready(s.id)) for s in starts))
                said_ready = True

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("stall_after, wait", [
    ("hello", "waiting for ready for the started bitmaps"),
    ("ready", "waiting for the destination to catch up (mark echo)"),
])
async def test_stalled_destination_names_the_wait(stall_after: str, wait: str) -> None:
    problems: list[BaseException] = []
    server, port = await _fake_dest(stall_after, problems)
    src = Daemon("source", options=MigrationOptions(small_threshold=0, io_timeout=0.4,
                                                    connect_timeout=2))
    e = src.registry.add("n", "b", 1 << 37, 65536)
    e.bitmap.set(0, 1 << 33)
    before = e.bitmap.words.copy()
    result = await asyncio.wait_for(src.migrate("127.0.0.1", port), 60)
    if problems:
        raise problems[0]
    assert not result.ok
    assert f"timed out after 0.4s {wait}" in result.error, result.error
    assert e.state is Ownership.OWNED and np.array_equal(e.bitmap.words, before)
    server.close()


async def test_source_stalled_mid_frame_frees_destination(tmp_path: Path) -> None:
    dest = Daemon("destination", str(tmp_path / "d"), io_timeout=0.4)
    _, port = await dest.listen("127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(encode_bytes(Hello(1, 1, "source", spec.CAPABILITIES)))
    await w.drain()
    got = await asyncio.wait_for(r.read(1 << 16), 5)
    assert [type(f) for f in frames_of(got)] == [Hello]
    w.write(encode_bytes(Start(0, "n", "stall", 1 << 37, 65536, 1024)))
    await w.drain()
    got = b""
    for _ in range(50):
        got += await asyncio.wait_for(r.read(1 << 16), 5)
        if any(type(f) is Ready for f in frames_of(got)):
            break
    assert dest.budget_used == 256 << 10
    # Half a bits frame, then silence.
    frame = bytes.fromhex("00100000") + b"\x86" + b"\x00" * 40
    w.write(frame[:30])
    await w.drain()
    rest = b""
    for _ in range(50):  # the destination's io_timeout (0.4 s) ends this, not the bound
        chunk = await asyncio.wait_for(r.read(1 << 16), 60)
        if not chunk:
            break
        rest += chunk
    errors = [f for f in frames_of(rest) if type(f).__name__ == "Error"]
    assert errors and errors[0].code == "timeout", errors
    assert "waiting for the next frame from the source" in errors[0].message
    assert dest.budget_used == 0 and not dest.reserved
    assert not list((tmp_path / "d" / "bitmaps").iterdir())
    w.close()
    # And it keeps serving.
    src, _e = make_source("after-stall", 4)
    res = await src.migrate("127.0.0.1", port)
    assert res.ok, res.error
    await dest.close()


# -- storage failures ------------------------------------------------------------------

def _assert_storage_refused(result: MigrationResult, e: Entry, before: np.ndarray,
                            dest: Daemon) -> None:
    assert not result.ok
    err = result.bitmaps[0].error
    assert err.startswith("storage:"), err
    assert e.state is Ownership.OWNED and np.array_equal(e.bitmap.words, before)
    assert dest.budget_used == 0 and not dest.reserved
    assert (e.node, e.name) not in dest.registry.entries


@pytest.mark.parametrize("call", ["pwrite", "fsync", "fdatasync"])
async def test_enospc_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         call: str) -> None:
    import bitmig.core.store

    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    real = getattr(os, call)

    def full(fd, *a):
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *a)

    monkeypatch.setattr(bitmig.core.store.os, call, full)
    if call == "fdatasync":  # only the background sync calls it: make sure one runs
        monkeypatch.setattr("bitmig.session.destination.SYNC_EVERY", 1)
    src, e = make_source("full", 5)
    before = e.bitmap.words.copy()
    result = await src.migrate("127.0.0.1", port)
    await settle(dest)
    monkeypatch.undo()
    _assert_storage_refused(result, e, before, dest)
    assert "No space left on device" in result.bitmaps[0].error
    assert not list((tmp_path / "d" / "bitmaps").iterdir())
    # Space again: the retry completes.
    retry = await src.migrate("127.0.0.1", port)
    assert retry.ok, retry.error


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_full_tmpfs_state_dir(tiny_tmpfs: Path) -> None:
    dest = Daemon("destination", str(tiny_tmpfs))
    _, port = await dest.listen("127.0.0.1", 0)
    # A 4 MiB bitmap in a 1 MiB file system: the spool's writes hit ENOSPC.
    src = Daemon("source", options=MigrationOptions(small_threshold=0))
    e = src.registry.add("n", "huge", 1 << 41, 65536)
    rng = np.random.default_rng(2)
    e.bitmap.fill_random(0.25, rng)
    before = e.bitmap.words.copy()
    result = await src.migrate("127.0.0.1", port)
    await settle(dest)
    _assert_storage_refused(result, e, before, dest)
    assert not list((tiny_tmpfs / "bitmaps").iterdir())
    # A bitmap that fits still goes through.
    small = src.registry.add("n", "fits", 1 << 37, 65536)
    small.bitmap.set(0, 1 << 30)
    ok = await src.migrate("127.0.0.1", port, keys=[("n", "fits")])
    assert ok.ok, ok.error


# -- destination process killed in each phase --------------------------------------------

@pytest.mark.parametrize("phase", ["setup", "bulk", "dirty", "completion"])
async def test_destination_killed_in_each_phase(tmp_path: Path, phase: str) -> None:
    state = tmp_path / "state"
    dp = DestProcess(state, tmp_path)
    port = dp.start()
    killed = []

    def kill(why: str) -> None:
        if not killed:
            killed.append(why)
            dp.kill()

    def hook(direction: str, done: int, data: bytes) -> None:
        # setup: the destination answered the start with ready (assembly and spool exist)
        if phase == "setup" and direction == "down" and done > 0:
            kill("ready in flight")

    def progress(p: dict) -> None:
        wl.step(30)
        if phase == "bulk" and p["phase"] == "bulk" and p["bytes_sent"] > 128 << 10:
            kill("mid bulk")
        elif phase == "dirty" and p["phase"] == "dirty" and p["pass"] >= 2:
            kill("after a dirty pass")
        elif phase == "completion" and p["phase"] == "completion":
            kill("frozen, before complete")

    proxy = FaultProxy(port, hook=hook)
    await proxy.start()
    src, e = make_source("killed", 7)
    # Tight downtime: several dirty passes are sure to run.
    src.options = MigrationOptions(**{**OPTS, "downtime_ms": 0.001, "max_passes": 4})
    initial = e.bitmap.words.copy()
    log: list = []
    wl = Workload([e], rate=0, seed=1007, log=log)
    try:
        result = await asyncio.wait_for(src.migrate("127.0.0.1", proxy.port,
                                                    progress=progress), 20)
        assert killed, f"never reached {phase}"
        assert not result.ok
        assert e.state is Ownership.OWNED
        assert np.array_equal(e.bitmap.words, replay(initial, log, e.key))
        # Restart on the same state directory: nothing partial is loaded.
        port = dp.start()  # returns once it listens, its state directory loaded
        good, bad = Store(state, clean=False).load_all()
        assert not good and not bad
        assert not [f for f in (state / "bitmaps").iterdir()]
        retry = await asyncio.wait_for(src.migrate("127.0.0.1", port), 20)
        assert retry.ok, retry.error
        assert e.state is Ownership.HANDED_OFF
        good, bad = Store(state, clean=False).load_all()
        assert not bad and len(good) == 1
        assert good[0][1].sha256().hex() == retry.bitmaps[0].sha256
        assert np.array_equal(good[0][1].words, e.bitmap.words)
    finally:
        await proxy.close()
        err = dp.stop()
        dp.kill()
    assert "refused stored bitmap" not in err


async def test_resume_after_a_cut_in_the_bulk_pass_resends_only_what_is_missing(
        tmp_path: Path) -> None:
    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    proxy = FaultProxy(port, cut_after=5 << 20, direction="up")
    await proxy.start()
    src = Daemon("source", options=MigrationOptions(small_threshold=0))
    e = src.registry.add("n", "b", 1 << 42, 65536)  # 8 MiB bitmap
    e.bitmap.fill_random(0.1, np.random.default_rng(4))
    first = await src.migrate("127.0.0.1", proxy.port)
    await proxy.close()
    assert not first.ok and e.state is Ownership.OWNED
    await settle(dest)
    assert (e.node, e.name) in dest.partials  # kept for the retry
    retry = await src.migrate("127.0.0.1", port)
    assert retry.ok, retry.error
    held = retry.bitmaps[0].resumed_chunks
    assert held > 0
    # Only the chunks the destination lacked went again (plus frame headers).
    missing = (e.bitmap.nchunks - held) * e.bitmap.chunk_size
    assert retry.bytes_sent < missing * 1.05 + 4096, (retry.bytes_sent, missing)
    got = dest.registry.get("n", "b").bitmap
    assert np.array_equal(got.words, e.bitmap.words)
