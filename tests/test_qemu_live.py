"""Live QEMU interop against qemu-storage-daemon, checking QEMU's view, not ours.

Source: bitmig reads the bitmaps of a running qemu-storage-daemon A (QMP) while a writer
writes through A's NBD export, folds deltas, and at the end holds exactly what A reports
(x-debug-block-dirty-bitmap-sha256); A's bitmaps equal those of a control daemon given
the same writes without bitmig. Destination: bitmig delivers bitmaps into daemon B.
Failures and refusals leave both daemons' bitmaps as they were. Skipped without QEMU.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faultproxy import FaultProxy
from qsd_live import HAVE_QSD, Qsd, make_image

from bitmig.core.bitmap import DirtyBitmap
from bitmig.daemon.control import acall
from bitmig.qemu.live import REC_PREFIX, LiveError, LiveSource
from bitmig.qemu.live_target import LiveTarget
from bitmig.qemu.qmp import QMPClient, QMPError
from bitmig.session.target import Incoming, TargetError

pytestmark = pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon, qemu-img, "
                                "qemu-io (apt-get install qemu-utils qemu-block-extra)")

SIZE = 256 << 20
BITMAPS = [("b64k", 64 << 10, True), ("b1m", 1 << 20, False), ("bsmall", 4096, True),
           ("empty", 64 << 10, True)]


@pytest.fixture
def daemons(tmp_path: Path):
    started: list[Qsd] = []

    def start(tag: str, bitmaps: list[tuple[str, int, bool]] = BITMAPS) -> Qsd:
        img = tmp_path / f"{tag}.qcow2"
        make_image(img, SIZE, bitmaps)
        q = Qsd(tmp_path, tag, img)
        started.append(q)
        return q

    yield start
    for q in started:
        q.stop()


def user(q: Qsd) -> dict[str, dict]:
    """The user's bitmaps (without bitmig's recorders, present while a source runs)."""
    return q.bitmaps(skip="bitmig-")


def no_leftovers(q: Qsd) -> None:
    assert not [b for b in q.bitmaps() if b.startswith("bitmig-")]
    assert not [n for n in q.nodes() if n.startswith("bitmig-")]


# -- the QMP client ----------------------------------------------------------------------


async def test_qmp_errors_are_clear(tmp_path: Path, daemons) -> None:
    with pytest.raises(QMPError, match="cannot connect"):
        await QMPClient.connect(str(tmp_path / "nothing.sock"), timeout=5)
    # A socket that answers something other than QMP.
    path = str(tmp_path / "notqmp.sock")

    async def junk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-OpenSSH\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_unix_server(junk, path)
    async with server:
        with pytest.raises(QMPError, match="not a QMP socket"):
            await QMPClient.connect(path, timeout=5)
    a = daemons("a")
    qmp = await QMPClient.connect(a.qmp)
    try:
        with pytest.raises(QMPError, match=r"nonode.*\(GenericError\)") as e:
            await qmp.execute("block-dirty-bitmap-add", node="nonode", name="x")
        assert e.value.qmp_class == "GenericError"
        assert "disk0" in {n["node-name"] for n in
                           await qmp.execute("query-named-block-nodes", flat=True)}
    finally:
        await qmp.close()


# -- the source --------------------------------------------------------------------------


async def test_live_read_follows_writes_and_leaves_qemu_as_a_control_run(daemons) -> None:
    a, control = daemons("a"), daemons("ctl")
    # Writes before, during (between reads) and after the first copy; the control
    # daemon gets the same writes without bitmig.
    seeds = [1, 2, 3, 4]
    for q in (a, control):
        await q.awrite(np.random.default_rng(seeds[0]), 40, SIZE)
    before = a.bitmaps()
    src = LiveSource(a.qmp)
    found = await src.open()
    assert {(b.name, b.granularity, b.enabled, b.persistent) for b in found} == {
        (n, g, e, True) for n, g, e in BITMAPS}
    await src.snapshot()
    assert {b.name for b in found if b.rec} == {n for n, _g, e in BITMAPS if e}
    for b in found:
        assert b.bitmap is not None and b.bitmap.sha256().hex() == before[b.name]["sha256"]
    for seed in seeds[1:3]:
        for q in (a, control):
            await q.awrite(np.random.default_rng(seed), 40, SIZE)
        for b in found:
            assert b.bitmap is not None
            b.bitmap.meta.flags[:] = False
        assert await src.poll() > 0
        # The chunks marked are those that changed: enabled bitmaps got new bits.
        assert any(b.bitmap is not None and b.bitmap.meta.count() for b in found if b.enabled)
    for q in (a, control):
        await q.awrite(np.random.default_rng(seeds[3]), 40, SIZE)  # the writer's last burst
    assert await src.finish() == []  # deltas alone were enough: no re-read
    after = a.bitmaps()
    for b in found:
        assert b.bitmap is not None
        assert b.bitmap.sha256().hex() == after[b.name]["sha256"], b.name
        assert b.bitmap.count() * b.granularity == after[b.name]["count"]  # QEMU counts bytes
    await src.close()
    # QEMU's view: A's bitmaps are what the writes alone make of them.
    assert a.bitmaps() == control.bitmaps()
    assert a.bitmaps()["b1m"]["count"] == 0 and a.bitmaps()["b64k"]["count"] > 0
    no_leftovers(a)


async def test_reset_during_migration_is_found_at_finish(daemons) -> None:
    a = daemons("a")
    await a.awrite(np.random.default_rng(7), 30, SIZE)
    src = LiveSource(a.qmp, names=["b64k"])
    try:
        [b] = await src.open()
        await src.snapshot()
        a.command("block-dirty-bitmap-clear", node="disk0", name="b64k")  # a backup job
        await a.awrite(np.random.default_rng(8), 5, SIZE)
        await src.poll()
        again = await src.finish()
        assert [x.name for x in again] == ["b64k"]
        assert b.bitmap is not None
        assert b.bitmap.sha256().hex() == a.bitmaps()["b64k"]["sha256"]
        assert b.bitmap.count() * 65536 == a.bitmaps()["b64k"]["count"]
    finally:
        await src.close()
    no_leftovers(a)


async def test_cut_qmp_connection_leaves_user_bitmaps_and_next_run_cleans_up(daemons) -> None:
    a = daemons("a")
    await a.awrite(np.random.default_rng(9), 30, SIZE)
    before = a.bitmaps()
    src = LiveSource(a.qmp)
    await src.open()
    await src.snapshot()
    assert src.qmp is not None
    src.qmp._writer.transport.abort()  # the connection is cut: no cleanup possible
    with pytest.raises(QMPError):
        await src.poll()
    await src.close()
    left = [b for b in a.bitmaps() if b.startswith(REC_PREFIX)]
    assert left  # the recorders stayed behind...
    await a.awrite(np.random.default_rng(10), 10, SIZE)
    expect = a.bitmaps()
    retry = LiveSource(a.qmp)
    await retry.open()  # ...and the next run removes them
    no_leftovers(a)
    await retry.snapshot()
    # Cut again, during the migration: finish (the writer has stopped) reconnects and
    # re-reads what deltas could not bring.
    assert retry.qmp is not None
    retry.qmp._writer.transport.abort()
    await a.awrite(np.random.default_rng(11), 10, SIZE)
    expect = a.bitmaps()
    again = await retry.finish()
    assert {b.name for b in again} >= {"b64k", "bsmall"}
    for b in retry.bitmaps:
        assert b.bitmap is not None and b.bitmap.sha256().hex() == expect[b.name]["sha256"]
    await retry.close()
    no_leftovers(a)
    assert {n: i["granularity"] for n, i in a.bitmaps().items()} == {
        n: i["granularity"] for n, i in before.items()}


async def test_failed_attempt_rearms_recording(daemons) -> None:
    """After `finish` (recording stopped) an attempt fails and the guest writes again:
    rearm takes a fresh consistent copy in place (the registry's object) and records
    again; a dropped connection is reconnected by rearm."""
    a = daemons("a")
    src = LiveSource(a.qmp)
    try:
        await src.open()
        await src.snapshot()
        objs = {b.name: b.bitmap for b in src.bitmaps}
        await src.finish()
        assert not src.recording
        await a.awrite(np.random.default_rng(12), 20, SIZE)  # the guest resumed
        assert {b.name for b in await src.rearm()} == {n for n, _g, e in BITMAPS if e}
        assert src.recording
        await a.awrite(np.random.default_rng(13), 20, SIZE)
        await src.disconnect()  # connection lost: recording stops, leftovers stay
        assert not src.recording
        await a.awrite(np.random.default_rng(14), 20, SIZE)
        await src.rearm()  # reconnects, removes leftovers, copies again
        await a.awrite(np.random.default_rng(15), 20, SIZE)
        await src.poll()
        assert await src.finish() == []
        want = a.bitmaps()
        for b in src.bitmaps:
            assert b.bitmap is objs[b.name]
            assert b.bitmap is not None and b.bitmap.sha256().hex() == want[b.name]["sha256"]
    finally:
        await src.close()
    no_leftovers(a)


async def test_source_refusals(daemons) -> None:
    a = daemons("a")
    with pytest.raises(LiveError, match="no block node 'vda'"):
        s = LiveSource(a.qmp, node="vda")
        try:
            await s.open()
        finally:
            await s.close()
    with pytest.raises(LiveError, match="no bitmap nope"):
        s = LiveSource(a.qmp, names=["b64k", "nope"])
        try:
            await s.open()
        finally:
            await s.close()
    no_leftovers(a)


# -- the destination ---------------------------------------------------------------------


def incoming(name: str, gran: int, enabled: bool = True, persistent: bool = True,
             node: str = "disk0", size: int = SIZE) -> Incoming:
    return Incoming(node, name, size, gran, enabled, persistent)


def random_bitmap(gran: int, seed: int, frac: float = 0.1) -> DirtyBitmap:
    bm = DirtyBitmap(SIZE, gran)
    bm.fill_random(frac, np.random.default_rng(seed))
    return bm


async def test_target_delivers_into_qemu(daemons) -> None:
    b = daemons("b", bitmaps=[("other", 65536, True)])
    t = LiveTarget(b.qmp)
    try:
        sent = {}
        for i, (name, gran, enabled) in enumerate(BITMAPS):
            inc = incoming(name, gran, enabled)
            await t.check(inc)
            sent[name] = random_bitmap(gran, i, 0.0 if name == "empty" else 0.3)
            await t.deliver(inc, sent[name])
    finally:
        await t.close()
    got = b.bitmaps()
    for name, gran, enabled in BITMAPS:
        assert got[name]["sha256"] == sent[name].sha256().hex()
        assert (got[name]["granularity"], got[name]["recording"], got[name]["persistent"]) \
            == (gran, enabled, True)
    no_leftovers(b)
    # Persistent: QEMU stores them in the image when it closes it.
    b.stop()
    b2 = Qsd(b.dir, "b2", b.image, nbd=False)
    try:
        assert {n: i["sha256"] for n, i in b2.bitmaps().items()} == {
            **{n: sent[n].sha256().hex() for n in sent}, "other": got["other"]["sha256"]}
    finally:
        b2.stop()


async def test_target_refusals_and_replace(daemons) -> None:
    b = daemons("b", bitmaps=[("taken", 65536, True)])
    before = b.bitmaps()
    t = LiveTarget(b.qmp)
    try:
        with pytest.raises(TargetError, match="no block node 'vda'") as e:
            await t.check(incoming("x", 65536, node="vda"))
        assert e.value.code == "storage"
        with pytest.raises(TargetError, match="already exists") as e:
            await t.check(incoming("taken", 65536))
        assert e.value.code == "exists"
        with pytest.raises(TargetError, match="already exists"):
            await t.deliver(incoming("taken", 65536), random_bitmap(65536, 1))
        with pytest.raises(TargetError, match="1024 bytes exceeds") as e:
            await t.check(incoming("n" * 1024, 65536))
        assert e.value.code == "limit"
        with pytest.raises(TargetError, match="covers") as e:
            await t.check(incoming("x", 65536, size=SIZE * 2))
        assert e.value.code == "limit"
    finally:
        await t.close()
    assert b.bitmaps() == before
    # --replace: same geometry replaced atomically, flags follow the received bitmap.
    t = LiveTarget(b.qmp, replace=True)
    try:
        new = random_bitmap(65536, 2)
        await t.deliver(incoming("taken", 65536, enabled=False), new)
        other = random_bitmap(1 << 20, 3)
        await t.deliver(incoming("taken", 1 << 20), other)  # another granularity
    finally:
        await t.close()
    got = b.bitmaps()["taken"]
    assert (got["sha256"], got["granularity"], got["recording"]) == (
        other.sha256().hex(), 1 << 20, True)
    no_leftovers(b)


async def test_target_failure_removes_what_it_added(daemons, monkeypatch) -> None:
    b = daemons("b", bitmaps=[("keep", 65536, True)])
    before = b.bitmaps()
    t = LiveTarget(b.qmp)
    data = random_bitmap(65536, 4)
    # QEMU ends up with other bits than received (as if the node were written meanwhile):
    # the bitmap must not be acknowledged, and what was added is removed again.
    monkeypatch.setattr(data, "sha256", lambda: b"\0" * 32)
    try:
        with pytest.raises(TargetError, match="differs from the received") as e:
            await t.deliver(incoming("new", 65536), data)
        assert e.value.code == "storage"
    finally:
        await t.close()
    assert b.bitmaps() == before
    no_leftovers(b)
    # QMP socket gone: a clear refusal, nothing changed.
    b.stop()
    t = LiveTarget(b.qmp)
    with pytest.raises(TargetError, match="cannot connect"):
        await t.check(incoming("new", 65536))


def test_qsd_fixture_sockets_listen(daemons) -> None:
    a = daemons("a")
    for path in (a.qmp, a.nbd):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)


# -- end to end: bitmig source --qmp A -> bitmig dest --qmp B --------------------------


class Proc:
    """A bitmig daemon subprocess; `line` is its first stdout line (it is ready then)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bitmig", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()
        if not self.line:
            raise AssertionError(self.proc.stderr.read() if self.proc.stderr else "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return self.proc.stderr.read() if self.proc.stderr else ""


class Watch:
    """A proxy in front of a destination, for one migration: `under_way` returns once
    bytes flow back from the destination (it answered the source's hello), so a test
    waits on the migration itself instead of polling the source's status."""

    def __init__(self, port: int) -> None:
        self.answered = asyncio.Event()
        self.proxy = FaultProxy(port, hook=self._hook)

    def _hook(self, direction: str, done: int, piece: bytes) -> None:
        if direction == "down":
            self.answered.set()

    async def start(self) -> int:
        """The port the source is to migrate to."""
        return await self.proxy.start()

    async def under_way(self) -> None:
        await asyncio.wait_for(self.answered.wait(), 60)  # the bound only catches a hang


async def start_migration(sctl: str, port: int, watches: list[Watch],
                          **kw: object) -> asyncio.Future:
    """Ask the source (control socket `sctl`) to migrate to `port` through a new Watch
    (added to `watches`, for the caller to close); return the control call's future once
    the migration is under way."""
    w = Watch(port)
    watches.append(w)
    job = asyncio.ensure_future(acall(sctl, "migrate", host="127.0.0.1",
                                      port=await w.start(), **kw))
    await w.under_way()
    return job


async def close_all(watches: list[Watch]) -> None:
    for w in watches:
        await w.proxy.close()


def _start_dest(tmp_path: Path, b: Qsd, tag: str) -> tuple[Proc, int]:
    d = Proc(["dest", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / f"st-{tag}"),
              "--control", str(tmp_path / f"{tag}.sock"), "--qmp", b.qmp])
    port = int(re.search(r"127\.0\.0\.1:(\d+)", d.line).group(1))  # type: ignore[union-attr]
    return d, port


async def test_end_to_end_live_qemu_to_qemu(tmp_path: Path, daemons) -> None:
    a, control = daemons("a"), daemons("ctl")
    b = daemons("b", bitmaps=[])
    writes = [(21, 40), (22, 40), (23, 40)]  # before, during the bulk pass, after it
    for q in (a, control):
        await q.awrite(np.random.default_rng(writes[0][0]), writes[0][1], SIZE)
    dest, port = _start_dest(tmp_path, b, "dest")
    sctl = str(tmp_path / "src.sock")
    src = Proc(["source", "--qmp", a.qmp, "--poll-interval", "0.05", "--control", sctl])
    watches: list[Watch] = []
    try:
        job = await start_migration(sctl, port, watches)
        for seed, n in writes[1:]:
            for q in (a, control):
                await q.awrite(np.random.default_rng(seed), n, SIZE)
        # The writer has stopped: the orchestrator lets the migration complete.
        await acall(sctl, "complete")
        result = await job
        assert result["ok"], result
    finally:
        src.stop()
        dest.stop()
        await close_all(watches)
    got, want = b.bitmaps(), a.bitmaps()
    for name, gran, enabled in BITMAPS:
        assert got[name]["sha256"] == want[name]["sha256"], name
        assert (got[name]["granularity"], got[name]["recording"], got[name]["persistent"]) \
            == (gran, enabled, True)
    assert a.bitmaps() == control.bitmaps()  # A: only the writes changed its bitmaps
    no_leftovers(a)
    no_leftovers(b)


async def test_end_to_end_dest_killed_then_retry(tmp_path: Path, daemons) -> None:
    a, b = daemons("a"), daemons("b", bitmaps=[])
    await a.awrite(np.random.default_rng(31), 40, SIZE)
    before = a.bitmaps()
    dest, port = _start_dest(tmp_path, b, "dest1")
    sctl = str(tmp_path / "src.sock")
    src = Proc(["source", "--qmp", a.qmp, "--poll-interval", "0.05", "--control", sctl])
    watches: list[Watch] = []
    try:
        # One attempt (no automatic retry): the test retries by hand below.
        job = await start_migration(sctl, port, watches, retries=1)
        dest.kill()  # during the bulk pass: the freeze gate is still closed
        result = await job
        assert not result["ok"]
        assert b.bitmaps() == {}  # B holds nothing
        assert user(a) == before
        dest, port = _start_dest(tmp_path, b, "dest2")
        job = await start_migration(sctl, port, watches, retries=1)
        await acall(sctl, "complete")
        assert (await job)["ok"]
    finally:
        src.stop()
        dest.stop()
        await close_all(watches)
    assert {n: i["sha256"] for n, i in b.bitmaps().items()} == {
        n: i["sha256"] for n, i in a.bitmaps().items()}
    assert a.bitmaps() == before
    no_leftovers(a)


async def test_end_to_end_source_killed_cuts_qmp_then_retry(tmp_path: Path, daemons) -> None:
    """The source dies mid-migration (its QMP connection cut, no cleanup): A keeps its
    bitmaps unchanged, B holds none, and the next source run removes the leftovers and
    completes."""
    a, b = daemons("a"), daemons("b", bitmaps=[])
    await a.awrite(np.random.default_rng(41), 40, SIZE)
    before = a.bitmaps()
    dest, port = _start_dest(tmp_path, b, "dest")
    sctl = str(tmp_path / "src1.sock")
    src = Proc(["source", "--qmp", a.qmp, "--poll-interval", "0.05", "--control", sctl])
    watches: list[Watch] = []
    try:
        job = await start_migration(sctl, port, watches, retries=1)
        src.kill()
        with pytest.raises((ConnectionError, ValueError, OSError)):
            await job  # the control connection died with the source
        assert user(a) == before
        assert [n for n in a.bitmaps() if n.startswith(REC_PREFIX)]  # left behind
        assert b.bitmaps() == {}
        await a.awrite(np.random.default_rng(42), 20, SIZE)
        sctl = str(tmp_path / "src2.sock")
        src = Proc(["source", "--qmp", a.qmp, "--poll-interval", "0.05", "--control", sctl])
        job = await start_migration(sctl, port, watches, retries=1)
        await acall(sctl, "complete")
        assert (await job)["ok"]
    finally:
        src.stop()
        dest.stop()
        await close_all(watches)
    assert {n: i["sha256"] for n, i in b.bitmaps().items()} == {
        n: i["sha256"] for n, i in a.bitmaps().items()}
    no_leftovers(a)
    no_leftovers(b)


def test_cli_qmp_errors_are_one_line(tmp_path: Path) -> None:
    """A QMP socket that does not answer (or a build without the hooks): exit 2 and one
    clear line, never a traceback."""
    for args in (["source", "--qmp", str(tmp_path / "none.sock"), "--control",
                  str(tmp_path / "s.sock")],
                 ["dest", "--qmp", str(tmp_path / "none.sock"), "--map", "no-equals-sign",
                  "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                  "--control", str(tmp_path / "d.sock")]):
        r = subprocess.run([sys.executable, "-m", "bitmig", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"bitmig {args[0]}: ") and "Traceback" not in r.stderr
        assert "--qmp" in r.stderr or "--map" in r.stderr


def test_dest_qmp_delivers_what_a_source_sends(tmp_path: Path, daemons) -> None:
    """`bitmig dest --qmp` with the daemon's delivery target: a plain source's bitmap
    arrives in qemu-storage-daemon B with the sha256 the source reports; a clash is
    refused and B keeps its bitmap."""
    b = daemons("b", bitmaps=[("taken", 65536, True)])
    before = b.bitmaps()
    dest, port = _start_dest(tmp_path, b, "dest")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "bitmig", "source", "--create", "disk0/fresh", "--create",
             "disk0/taken", "--disk-size", str(SIZE), "--fill", "0.2", "--control",
             str(tmp_path / "s.sock"), "--migrate-to", f"127.0.0.1:{port}", "--retries", "1"],
            capture_output=True, text=True, timeout=120)
    finally:
        dest.stop()
    result = json.loads(r.stdout.strip().splitlines()[-1])
    by = {x["name"]: x for x in result["bitmaps"]}
    assert by["fresh"]["ok"] and b.bitmaps()["fresh"]["sha256"] == by["fresh"]["sha256"]
    assert not by["taken"]["ok"] and "already exists" in by["taken"]["error"]
    assert b.bitmaps()["taken"] == before["taken"]
    no_leftovers(b)
