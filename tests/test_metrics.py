"""`--metrics HOST:PORT`: Prometheus text served by both daemons, scraped mid-migration."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from bitmig.daemon.control import acall
from bitmig.daemon.metrics import serve_metrics
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.service import Daemon
from bitmig.tools.workload import Workload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(port: int, path: str = "/metrics") -> tuple[str, dict[str, float]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await r.read()
    w.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    samples: dict[str, float] = {}
    for line in body.splitlines() if " 200 " in head.splitlines()[0] else []:
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return head.splitlines()[0], samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    for k, v in samples.items():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})?", k)
        assert m
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if m.group(1) == name and all(have.get(a) == b for a, b in labels.items()):
            return v
    return 0.0


async def test_metrics_scraped_during_migration(tmp_path: Path) -> None:
    mport = free_port()
    dest = subprocess.Popen(
        [sys.executable, "-m", "bitmig", "dest", "--listen", "127.0.0.1:0", "--state-dir",
         str(tmp_path / "dst"), "--control", str(tmp_path / "d.sock"), "--log-level",
         "warning", "--metrics", f"127.0.0.1:{mport}"], stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(dest.stdout.readline), 30)
        dport = int(line.split()[2].rsplit(":", 1)[1])
        src = Daemon("source", None, None, MigrationOptions(downtime_ms=0.001, max_passes=40,
                                                            small_threshold=64 << 10))
        sport = (await serve_metrics(src, "127.0.0.1", 0)).sockets[0].getsockname()[1]
        e = src.registry.add("drive0", "b0", 2 << 40, 64 << 10, 1024)
        e.bitmap.set_many(np.random.default_rng(3).integers(0, e.bitmap.nbits, 5000))
        status, before = await scrape(sport)
        assert status == "HTTP/1.1 200 OK"
        assert value(before, "bitmig_migrations", state="running") == 0
        load = Workload([e], 300_000, seed=3)
        load.start()
        # Writes between every window and pass keep it in dirty passes (forced after 40),
        # long enough for scrapes to land inside it whatever the machine's load.
        progressed = asyncio.Event()

        def progress(p: dict) -> None:
            load.step(3000)
            progressed.set()

        task = asyncio.create_task(src.migrate("127.0.0.1", dport, progress=progress))
        during_src, during_dst = [], []
        while not task.done():  # one scrape of each after each progress report
            waiter = asyncio.create_task(progressed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if progressed.is_set() and not task.done():
                progressed.clear()
                during_src.append((await scrape(sport))[1])
                during_dst.append((await scrape(mport))[1])
        result = await task
        await load.stop()
        assert result.ok, result.error
        running = [s for s in during_src if value(s, "bitmig_migrations", state="running")]
        assert running, "no scrape landed inside the migration"
        assert any(value(s, "bitmig_phase", phase="dirty") == 1 and value(s, "bitmig_pass") >= 1
                   for s in running)
        assert any(value(s, "bitmig_pending_dirty_bytes") > 0 for s in running)
        assert any(value(s, "bitmig_frames_received_total", kind="bits") > 0
                   for s in during_dst)

        _, after = await scrape(sport)
        assert value(after, "bitmig_migrations", state="succeeded") == 1
        assert value(after, "bitmig_migrations", state="running") == 0
        assert value(after, "bitmig_phase", phase="done") == 1
        assert value(after, "bitmig_pass") == result.passes
        sent = sum(v for k, v in after.items() if k.startswith("bitmig_bytes_sent_total"))
        assert sent == result.bytes_sent
        for kind, n in result.frames.items():
            assert value(after, "bitmig_frames_sent_total", kind=kind) == n
        assert value(after, "bitmig_last_downtime_seconds") == round(result.downtime_ms / 1000,
                                                                      6)
        # The destination counts the connection when it has answered end and closed; the
        # source may return first. Scrape until it has (the bound only catches a hang).
        for _ in range(10_000):
            _, dst = await scrape(mport)
            if value(dst, "bitmig_migrations", side="destination", state="running") == 0:
                break
        assert value(dst, "bitmig_migrations", side="destination", state="succeeded") == 1
        recv = sum(v for k, v in dst.items() if k.startswith("bitmig_bytes_received_total"))
        assert recv == result.bytes_sent
        assert value(dst, "bitmig_frames_sent_total", kind="ack") == 1
        assert (await scrape(mport, "/nope"))[0].startswith("HTTP/1.1 404")
        await src.close()
        await acall(str(tmp_path / "d.sock"), "shutdown")
        await asyncio.to_thread(dest.wait, 10)
    finally:
        if dest.poll() is None:
            dest.kill()


async def test_errors_by_code() -> None:
    d = Daemon("destination")
    d.count_error("bad_field")
    d.count_error("bad_field")
    port = (await serve_metrics(d, "127.0.0.1", 0)).sockets[0].getsockname()[1]
    _, s = await scrape(port)
    assert value(s, "bitmig_errors_total", code="bad_field") == 2
    await d.close()
