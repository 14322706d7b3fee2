"""Shared pieces of the benchmarks: test bitmaps, process memory, destinations, raw TCP."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.daemon.control import acall
from bitmig.daemon.registry import RegistryError
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
        "state_dir_fs": "tmpfs" if state_root() == "/dev/shm" else fs_type(state_root()),
        "disk_dir": state_root("disk"), "disk_fs": fs_type(state_root("disk")),
    }


# Where the "disk" variants store: a directory on the machine's disk, not tmpfs (/tmp may
# be tmpfs on some systems; /var/tmp is on disk by convention). `bitmig bench --disk-dir`.
DISK_DIR = {"path": "/var/tmp"}


def state_root(where: str = "tmpfs") -> str:
    """Where destinations store. "tmpfs": /dev/shm when there is one, so the figures
    measure the protocol and not the disk (the store path is the same code). "disk": the
    machine's disk, so the fsync inside the frozen window is what a user meets."""
    if where == "disk":
        d = DISK_DIR["path"]
        return d if os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def fs_type(path: str) -> str:
    """File system type of the mount holding `path` (from /proc/mounts), or "unknown"."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


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


@dataclass
class Dest:
    """A running destination; `events` holds its trace's freeze records once it stopped."""

    proc: Any
    host: str
    port: int
    sock: str
    events: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def destination(memory_budget: int = 16 * GiB, where: str = "tmpfs",
                      trace: bool = False) -> AsyncIterator[Dest]:
    """A `bitmig dest` process on loopback storing on `where` ("tmpfs" or "disk"). With
    `trace`, the destination writes a protocol trace (to tmpfs) and, once it stopped,
    `events` holds its `stored` events and received `complete` frames. Tracing costs a
    CRC-32 of every payload, so timed throughput runs go without it."""
    with tempfile.TemporaryDirectory(prefix="bitmig-bench-", dir=state_root(where)) as tmp, \
            tempfile.TemporaryDirectory(prefix="bitmig-bench-trace-",
                                        dir=state_root("tmpfs")) as ttmp:
        tpath = os.path.join(ttmp, "dest.jsonl") if trace else None
        proc, host, port, sock = await start_dest(
            Path(tmp), trace=tpath, extra=["--memory-budget", str(memory_budget)])
        d = Dest(proc, host, port, sock)
        try:
            yield d
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
            if tpath and os.path.exists(tpath):
                d.events = _freeze_records(tpath)


def _freeze_records(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            if '"stored"' not in line and '"complete"' not in line:
                continue
            rec = json.loads(line)
            if rec.get("type") == "stored" or (rec.get("type") == "frame" and
                                               rec.get("kind") == "complete" and
                                               rec.get("dir") == "recv"):
                out.append(rec)
    return out


def freeze_breakdown(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The destination's part of the frozen window, from its trace: from the first
    `complete` received to the last bitmap stored and acked. verify: digest and count
    check; store: the time during which a commit (header, fdatasync, rename, directory
    fsync) ran, commits grouped together counted once (the union of the bitmaps' commit
    intervals); wait: the rest, mostly waiting for the background fsync of the spool
    started before the freeze (one bitmap only). fsync_in_freeze_ms = store + wait: the
    durability cost inside the frozen window (an upper bound)."""
    done = [e for e in events if e.get("type") == "stored"]
    comp = [e["mono"] for e in events if e.get("type") == "frame"]
    if not done or not comp:
        return {"dest_bitmaps_stored": len(done)}
    verify = sum(e.get("verify_ms", 0.0) for e in done)
    store = union_ms([(e["mono"] - e.get("store_ms", 0.0) / 1000, e["mono"]) for e in done])
    span = (max(e["mono"] for e in done) - min(comp)) * 1000
    # With one bitmap, the rest of the span is the wait for the spool's background fsync;
    # with many, it also holds receiving the others' frames, so only commits count.
    wait = max(0.0, span - verify - store) if len(done) == 1 else None
    return {"dest_bitmaps_stored": len(done), "dest_complete_to_ack_ms": round(span, 2),
            "dest_verify_ms": round(verify, 2), "dest_store_ms": round(store, 2),
            "dest_wait_ms": round(wait, 2) if wait is not None else None,
            "fsync_in_freeze_ms": round(store + (wait or 0.0), 2)}


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Milliseconds covered by at least one of the (start, end) spans, in seconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total * 1000


async def dest_digests(sock: str, keys: list[tuple[str, str]]) -> dict[str, str | None]:
    """sha256 of each bitmap as the destination holds it (None: it does not)."""
    out: dict[str, str | None] = {}
    for node, name in keys:
        try:
            out[f"{node}/{name}"] = (await acall(sock, "query", node=node, name=name))["sha256"]
        except RegistryError:  # e.g. "no such bitmap": it did not arrive
            out[f"{node}/{name}"] = None
    return out


def disk_write_s(where: str, nbytes: int) -> float:
    """Seconds to write `nbytes` sequentially (8 MiB writes) to a new file on `where` and
    fdatasync it: what the disk itself allows for storing a bitmap of that size."""
    buf = b"\xa5" * (8 * MiB)
    with tempfile.NamedTemporaryFile(dir=state_root(where), prefix="bitmig-bench-") as f:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= os.write(f.fileno(), buf[: min(left, len(buf))])
        os.fdatasync(f.fileno())
        return time.perf_counter() - t0


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
