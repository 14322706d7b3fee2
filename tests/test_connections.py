"""Issue 9 item 5: a destination caps its connections (in all and per peer address),
refuses extra ones at accept, and bounds what partly received frames can hold."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitmig.core import defaults
from bitmig.daemon.metrics import render
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.service import Daemon
from bitmig.protocol import spec


async def _connect(port: int, src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


async def _refused(r: asyncio.StreamReader) -> bool:
    """True when the destination closed at once without sending anything (a destination
    never speaks first, so an admitted connection stays silent until its timeout)."""
    try:
        return await asyncio.wait_for(r.read(1), 30) == b""
    except ConnectionResetError:
        return True


async def _until(d: Daemon, cond) -> None:
    """Wait on the daemon's connection-change event until cond() holds."""
    while not cond():
        d.connections_changed.clear()
        await asyncio.wait_for(d.connections_changed.wait(), 30)


async def _honest(port: int) -> None:
    src = Daemon("source", options=MigrationOptions(small_threshold=0))
    e = src.registry.add("honest", "b", 1 << 40, 65536, 1024)
    e.bitmap.fill_random(0.05, np.random.default_rng(1))
    want = e.bitmap.sha256()
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    assert result.bitmaps[0].sha256 == want.hex()


async def test_caps_total_and_per_peer_with_an_honest_migration(tmp_path: Path) -> None:
    d = Daemon("destination", str(tmp_path / "d"), connect_timeout=60, io_timeout=60,
               max_connections=4, max_connections_per_peer=2)
    _, port = await d.listen("127.0.0.1", 0)
    held = []
    try:
        # One peer: two admitted, the next three closed at once.
        for _ in range(2):
            held.append(await _connect(port, "127.0.0.2"))
        await _until(d, lambda: d.connections["127.0.0.2"] == 2)
        extra = [await _connect(port, "127.0.0.2") for _ in range(3)]
        assert all([await _refused(r) for r, _ in extra])
        assert d.refused_connections == {"per_peer": 3}
        # A second peer fills the total; a third is refused for the total.
        for _ in range(2):
            held.append(await _connect(port, "127.0.0.3"))
        await _until(d, lambda: sum(d.connections.values()) == 4)
        r, w = await _connect(port, "127.0.0.4")
        assert await _refused(r)
        assert d.refused_connections == {"per_peer": 3, "total": 1}
        text = render(d)
        assert 'bitmig_connections_refused_total{side="destination",reason="per_peer"} 3' in text
        assert 'bitmig_connections_open{side="destination"} 4' in text
        # The second peer leaves; the first stays at its cap: an honest source is served.
        for _, w in held[2:]:
            w.close()
        await _until(d, lambda: sum(d.connections.values()) == 2)
        await _honest(port)
        assert d.connections == {"127.0.0.2": 2}
    finally:
        for _, w in held:
            w.transport.abort()
        await d.close()


def test_connection_memory_bound_is_stated_from_the_limits() -> None:
    assert defaults.CONNECTION_MEMORY == (2 * defaults.READ_BUFFER + 256 * 1024
                                          + spec.MAX_FRAME_BYTES)
    assert defaults.MAX_CONNECTIONS_PER_PEER <= defaults.MAX_CONNECTIONS


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


async def _answered(r: asyncio.StreamReader) -> bool:
    """Read until the destination closes; True when it sent anything first (an admitted
    connection gets the hello-timeout error frame, a refused one nothing)."""
    got = b""
    try:
        while data := await asyncio.wait_for(r.read(1 << 16), 300):
            got += data
    except ConnectionError:  # reset, or a broken pipe for the unsent rest of our frame
        pass
    return bool(got)


async def test_flood_of_connections_and_half_sent_frames_under_1024_descriptors(
        tmp_path: Path) -> None:
    """A `bitmig dest` limited to 1,024 descriptors: one peer opens 300 connections and
    half-sends a 4 MiB frame on each; the destination serves its per-peer cap, refuses the
    rest at accept, its memory stays within the stated bound, and an honest migration
    completes and verifies meanwhile."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    dest = subprocess.Popen(
        [sys.executable, "-m", "bitmig", "dest", "--listen", "127.0.0.1:0", "--state-dir",
         str(tmp_path / "d"), "--control", str(tmp_path / "d.sock"), "--connect-timeout",
         "15", "--log-level", "error"],
        stdout=subprocess.PIPE, text=True, preexec_fn=limit)
    conns = []
    try:
        line = await asyncio.wait_for(asyncio.to_thread(dest.stdout.readline), 60)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        rss0 = _rss_kib(dest.pid)
        half = spec.MAX_FRAME_BYTES.to_bytes(4, "big") + b"\x00" * (2 << 20)
        for _ in range(300):
            r, w = await _connect(port, "127.0.0.2")
            try:
                w.write(half)  # not even a hello: bytes of an unfinished frame
            except ConnectionError:
                pass  # refused already
            conns.append((r, w))
        answers = asyncio.gather(*(_answered(r) for r, _ in conns))
        await _honest(port)
        grew = (_rss_kib(dest.pid) - rss0) * 1024
        fds = len(os.listdir(f"/proc/{dest.pid}/fd"))
        admitted = sum(await answers)
        assert admitted == defaults.MAX_CONNECTIONS_PER_PEER, admitted
        bound = defaults.MAX_CONNECTIONS_PER_PEER * defaults.CONNECTION_MEMORY + (64 << 20)
        assert grew < bound, f"RSS grew {grew >> 20} MiB, bound {bound >> 20} MiB"
        assert fds < 64, fds
    finally:
        for _, w in conns:
            w.transport.abort()
        dest.terminate()
        dest.wait(60)


@pytest.mark.parametrize("opt", ["--max-connections", "--max-connections-per-peer"])
def test_cli_refuses_a_zero_cap(tmp_path: Path, opt: str) -> None:
    out = subprocess.run([sys.executable, "-m", "bitmig", "dest", "--listen", "127.0.0.1:0",
                          "--state-dir", str(tmp_path), "--control", str(tmp_path / "c.sock"),
                          opt, "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 1" in out.stderr
