"""Shared pieces of the benchmarks: test bitmaps, process memory, destinations, raw TCP."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.daemon.control import acall
from bitmig.protocol.geometry import bit_count
from bitmig.tools.demo import start_dest

MiB = 1 << 20
GiB = 1 << 30
GB = 1e9
GRAN = 64 * 1024
FILL_STEP = 8 * MiB  # bytes of words generated at once (bounds temporaries)


def machine() -> dict[str, Any]:
    import msgpack

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version)),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "state_dir_fs": "tmpfs" if state_root() == "/dev/shm" else "disk",
    }


def state_root() -> str | None:
    """Where destinations store: tmpfs when there is one, so the figures measure the
    protocol and not the disk's fsync bandwidth (the store path is the same code)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def random_words(nbytes: int, p: float, seed: int = 1) -> np.ndarray:
    """Serialized words of a bitmap where each bit is set with probability p.

    p = 0.5 is uniform random words; p < 1/64 places bits by geometric gaps (an exact
    Bernoulli process); other p compare 16-bit uniforms to a threshold (error < 1e-5).
    """
    rng = np.random.default_rng(seed)
    n = nbytes // 8
    if p < 1 / 64:
        words = np.zeros(n, dtype="<u8")
        nbits, pos = n * 64, -1
        while True:
            gaps = rng.geometric(p, 1 << 20)
            at = pos + np.cumsum(gaps)
            at = at[at < nbits]
            if at.size:
                np.bitwise_or.at(words, at >> 6, np.left_shift(np.uint64(1),
                                                             (at & 63).astype(np.uint64)))
                pos = int(at[-1])
            if at.size < gaps.size:
                return words
    words = np.empty(n, dtype="<u8")
    step = FILL_STEP // 8 if p == 0.5 else 1 << 17
    thr = np.uint16(round(p * 65536))
    for i in range(0, n, step):
        k = min(step, n - i)
        if p == 0.5:
            words[i : i + k] = rng.bit_generator.random_raw(k)
        else:
            bits = rng.integers(0, 1 << 16, k * 64, dtype=np.uint16) < thr
            words[i : i + k] = np.packbits(bits, bitorder="little").view("<u8")
    return words


def bitmap_of(nbytes: int, p: float, granularity: int = GRAN, seed: int = 1,
              chunk_size: int = 1024, disk_size: int | None = None) -> DirtyBitmap:
    """A bitmap of `nbytes` serialized bytes (disk_size defaults to exactly that many
    bits) with bits set at probability p; bits past the end of the disk are cleared."""
    disk = disk_size or nbytes * 8 * granularity
    words = random_words(nbytes, p, seed)
    nbits = bit_count(disk, granularity)
    if nbits % 64:
        words[-1] &= np.uint64((1 << (nbits % 64)) - 1)
    return DirtyBitmap(disk, granularity, chunk_size, words=words)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


@asynccontextmanager
async def destination(memory_budget: int = 16 * GiB) -> AsyncIterator[tuple[Any, str, int, str]]:
    """A `bitmig dest` process on loopback; yields (proc, host, port, control socket)."""
    with tempfile.TemporaryDirectory(prefix="bitmig-bench-", dir=state_root()) as tmp:
        proc, host, port, sock = await start_dest(
            Path(tmp), extra=["--memory-budget", str(memory_budget)])
        try:
            yield proc, host, port, sock
        finally:
            try:
                await acall(sock, "shutdown")
            except OSError:
                pass
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


RAW_READER = r"""
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
buf = bytearray(1 << 20)
v = memoryview(buf)
got = 0
while got < n:
    k = s.recv_into(v, min(len(buf), n - got))
    if not k:
        break
    got += k
s.sendall(b"k")
s.close()
"""


def raw_tcp(data: Any, runs: int = 3) -> list[float]:
    """Seconds for this process to sendall `data` to a child process reading it on
    loopback, until the child acknowledges the last byte. One figure per run."""
    mv = memoryview(data).cast("B")
    out = []
    for _ in range(runs):
        ls = socket.create_server(("127.0.0.1", 0))
        port = ls.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", RAW_READER, str(mv.nbytes), str(port)])
        conn, _ = ls.accept()
        t0 = time.perf_counter()
        conn.sendall(mv)
        ack = conn.recv(1)
        dt = time.perf_counter() - t0
        conn.close()
        ls.close()
        child.wait()
        if ack != b"k":
            raise RuntimeError("raw TCP reader did not acknowledge")
        out.append(dt)
    return out
