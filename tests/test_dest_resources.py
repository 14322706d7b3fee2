"""What a destination holds for bitmaps that do not complete (issue 9 items 3 and 4,
issue 12's budget defect), against a real daemon over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from wire import frames_of

from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.core.planner import Planner
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.service import Daemon
from bitmig.protocol import spec
from bitmig.protocol.codec import encode_bytes
from bitmig.protocol.events import Ack, Complete, Error, Hello, Ready, Start
from bitmig.protocol.spec import ErrorCode
from bitmig.session.target import Incoming, TargetError

HELLO = encode_bytes(Hello(1, 1, "source", spec.CAPABILITIES))
TOKEN = b"r" * 16
DISK, GRAN, CHUNK = 1 << 37, 65536, 1024  # 256 KiB serialized, 256 chunks


async def dest_daemon(tmp_path: Path, **kw) -> tuple[Daemon, int, asyncio.Queue[None]]:
    """A destination, and a queue that gets an item each time a connection has ended."""
    d = Daemon("destination", str(tmp_path / "d"), **kw)
    ended: asyncio.Queue[None] = asyncio.Queue()
    arm = d._arm_expiry
    d._arm_expiry = lambda: (arm(), ended.put_nowait(None))  # called as a receiver ends
    _, port = await d.listen("127.0.0.1", 0)
    return d, port, ended


class Peer:
    """A hand-driven source: frames out, whole frames in."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.buf = r, w, b""

    @classmethod
    async def open(cls, port: int) -> Peer:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        p = cls(r, w)
        w.write(HELLO)
        assert type((await p.read(1))[0]) is Hello
        return p

    async def read(self, n: int) -> list:
        """The next n frames (or fewer, if the destination closes)."""
        while len(frames_of(self.buf)) < n:
            data = await asyncio.wait_for(self.r.read(1 << 16), 30)
            if not data:
                break
            self.buf += data
        got = frames_of(self.buf)[:n]
        self.buf = self.buf[sum(len(encode_bytes(e)) for e in got):]
        return got

    def send(self, *events) -> None:
        for e in events:
            self.w.write(encode_bytes(e))

    def cut(self) -> None:
        self.w.transport.abort()


def temp_files(d: Daemon) -> list[str]:
    return [p.name for p in d.store.dir.iterdir() if ".tmp-" in p.name]


def source_bitmap() -> DirtyBitmap:
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    bm.fill_random(0.1, np.random.default_rng(3))
    return bm


async def test_resumed_bitmap_releases_its_budget(tmp_path: Path) -> None:
    """Issue 12: after a cut and a resume, the bitmap's budget stayed taken past its ack;
    after two such resumes a fresh start within the budget was refused with `limit`."""
    d, port, ended = await dest_daemon(tmp_path, memory_budget=3 * (256 << 10))
    bm = source_bitmap()
    frames = Planner(bm, 0, 64 << 10).take_all()
    for attempt in range(2):
        name = f"b{attempt}"
        st = Start(0, "n", name, DISK, GRAN, CHUNK, True, False, True, TOKEN)
        p = await Peer.open(port)
        p.send(st)
        assert await p.read(1) == [Ready(0)]
        p.send(*frames[: len(frames) // 2])
        p.cut()
        await ended.get()
        assert ("n", name) in d.partials
        p = await Peer.open(port)
        p.send(st)
        (ready,) = await p.read(1)
        assert type(ready) is Ready and ready.have is not None  # resumed
        p.send(*frames[len(frames) // 2 :], Complete(0, tree_digest(bm.words.data), bm.count()))
        assert type((await p.read(1))[0]) is Ack
        p.cut()
        await ended.get()
        assert d.budget_used == 0, d.budget_used
    p = await Peer.open(port)
    for i in range(3):
        p.send(Start(i, "n", f"fresh{i}", DISK, GRAN, CHUNK, True, False, True))
    assert await p.read(3) == [Ready(0), Ready(1), Ready(2)]
    p.cut()
    await ended.get()
    assert d.budget_used == 0 and not temp_files(d)
    await d.close()


async def test_fatal_error_discards_the_connections_bitmaps(tmp_path: Path) -> None:
    """Issue 9 item 3: a fatal error found here (one start too many, a body that is not
    msgpack) discards every bitmap of the connection: nothing is parked for a retry."""
    d, port, ended = await dest_daemon(tmp_path)
    n = 40
    for fatal in (b"\x00\x00\x00\x02\xc1\xc1", "limit"):
        p = await Peer.open(port)
        p.send(*(Start(i, "n", f"{fatal!r}{i}", 8 * 64 * GRAN, GRAN, 8, True, False, True,
                       TOKEN) for i in range(n)))
        assert all(type(e) is Ready for e in await p.read(n))
        assert len(temp_files(d)) == n
        if fatal == "limit":  # fill the connection's bitmaps up to the protocol's limit
            p.send(*(Start(i, "n", f"x{i}", 8 * 64 * GRAN, GRAN, 8, True, False, True, TOKEN)
                     for i in range(n, spec.MAX_BITMAPS + 1)))
        else:
            p.w.write(fatal)
        got = await p.read(spec.MAX_BITMAPS + 2)
        assert type(got[-1]) is Error and got[-1].id is None, got[-1]
        assert got[-1].code == ("limit" if fatal == "limit" else "malformed")
        await ended.get()
        assert not d.partials and not temp_files(d) and d.budget_used == 0
        assert not d.reserved and d.intake.held == 0
    await d.close()


async def flood_tiny_bitmaps(port: int) -> int:
    """One connection starts 1,024 bitmaps of 8 bytes with tokens, then is cut: what it
    may leave parked. Returns how many the destination accepted."""
    p = await Peer.open(port)
    p.send(*(Start(i, "flood", f"b{i}", 8 * 64 * GRAN, GRAN, 8, True, False, True, TOKEN)
             for i in range(spec.MAX_BITMAPS)))
    got = await p.read(spec.MAX_BITMAPS)
    p.cut()
    assert len(got) == spec.MAX_BITMAPS
    refused = [e for e in got if type(e) is Error]
    assert all(e.code == "limit" for e in refused)
    return len(got) - len(refused)


async def honest_migration(port: int) -> str:
    src = Daemon("source", options=MigrationOptions(small_threshold=0, frame_payload=64 << 10))
    e = src.registry.add("honest", "b", 1 << 40, 65536, 1024)
    e.bitmap.fill_random(0.1, np.random.default_rng(1))
    want = e.bitmap.sha256().hex()
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    assert result.bitmaps[0].sha256 == want
    return want


async def test_one_peer_cannot_hold_what_an_honest_migration_needs(tmp_path: Path) -> None:
    """Issue 9 item 4: 1,024 tiny bitmaps with tokens, then a cut: the destination holds
    at most its per-connection cap of them, parked without a descriptor, each costing the
    minimum budget; an honest migration then completes and verifies."""
    d, port, ended = await dest_daemon(tmp_path)
    accepted = await flood_tiny_bitmaps(port)
    await ended.get()
    assert accepted == defaults.MAX_BITMAPS_PER_CONNECTION
    assert len(d.partials) == accepted and d.spools.open_descriptors() == 0
    assert d.budget_used == accepted * defaults.MIN_BITMAP_COST
    assert len(temp_files(d)) == accepted
    await honest_migration(port)
    assert d.registry.get("honest", "b") is not None
    await d.close()


async def flood_connections(port: int) -> list[asyncio.StreamWriter]:
    """Issue 9 item 5: 300 connections from one peer address, each holding half of a
    4 MiB frame. They stay open while the honest migration runs (the caller aborts them)."""
    half = spec.MAX_FRAME_BYTES.to_bytes(4, "big") + b"\0" * (2 << 20)
    writers = []
    for _ in range(300):
        _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        try:
            w.write(half)
        except ConnectionError:
            pass  # refused at accept already
        writers.append(w)
    return writers


# Hostile peers run against a destination limited to 1,024 descriptors while an honest
# migration completes: items 4 (bitmaps held) and 5 (connections, partial frames).
HOSTILE: list[Callable[[int], Awaitable[object]]] = [flood_tiny_bitmaps, flood_connections]


def test_descriptor_limited_destination_survives_hostile_peers(tmp_path: Path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    ctl = tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitmig", "dest", "--listen", "127.0.0.1:0", "--state-dir",
         str(tmp_path / "state"), "--control", str(ctl)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), proc.stderr.read()
        port = int(line.split()[2].rsplit(":", 1)[1])

        async def main() -> str:
            held = await asyncio.gather(*(h(port) for h in HOSTILE))
            try:
                return await honest_migration(port)
            finally:
                for w in (w for x in held if isinstance(x, list) for w in x):
                    w.transport.abort()

        want = asyncio.run(main())
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < 64, f"the destination holds {fds} descriptors"
        q = subprocess.run([sys.executable, "-m", "bitmig", "ctl", str(ctl), "query",
                            "node=honest", "name=b"], capture_output=True, text=True, check=True)
        assert json.loads(q.stdout)["sha256"] == want
    finally:
        proc.terminate()
        proc.wait(10)


class FakeTarget:
    """Refuses `refuse_check` at check and `refuse_deliver` at deliver; takes the rest."""

    description = "fake target"

    def __init__(self) -> None:
        self.delivered: dict[str, bytes] = {}

    async def check(self, bitmap: Incoming) -> None:
        if bitmap.name == "refuse_check":
            raise TargetError(ErrorCode.EXISTS, "the node already has refuse_check")

    async def deliver(self, bitmap: Incoming, data: DirtyBitmap) -> None:
        if bitmap.name == "refuse_deliver":
            raise TargetError(ErrorCode.STORAGE, "the image is read-only")
        self.delivered[bitmap.name] = data.sha256().hex()


async def test_delivery_target(tmp_path: Path) -> None:
    target = FakeTarget()
    d, port, _ended = await dest_daemon(tmp_path, target=target)
    src = Daemon("source", options=MigrationOptions(small_threshold=0, frame_payload=64 << 10))
    for name in ("ok", "refuse_check", "refuse_deliver"):
        e = src.registry.add("n", name, 1 << 36, 65536, 1024)
        e.bitmap.fill_random(0.1, np.random.default_rng(len(name)))
    result = await src.migrate("127.0.0.1", port)
    got = {b.name: b for b in result.bitmaps}
    assert got["ok"].ok and target.delivered == {"ok": got["ok"].sha256}
    assert not got["refuse_check"].ok and "already has" in got["refuse_check"].error
    assert not got["refuse_deliver"].ok and "read-only" in got["refuse_deliver"].error
    # A bitmap the target refused leaves no stored copy that looks valid.
    assert {(m.node, m.name) for m, _ in d.store.load_all()[0]} == {("n", "ok")}
    assert set(d.registry.entries) == {("n", "ok")}
    assert d.budget_used == 0 and not temp_files(d)
    await d.close()
