"""Issue 9 items 6 and 8: the metrics endpoint has one deadline per request and the
listen policy of --listen; the source refuses plain TCP to a non-loopback host."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bitmig.daemon.metrics as metrics
from bitmig.daemon.metrics import MetricsBindError, serve_metrics
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.registry import RegistryError
from bitmig.daemon.service import Daemon

BITMIG = [sys.executable, "-m", "bitmig"]
NOT_LOOPBACK = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never bound, never connected to


async def _closed(r: asyncio.StreamReader) -> bytes:
    """What the endpoint sends until it closes (a reset counts as closed: it stopped
    reading a request it will not answer)."""
    try:
        return await r.read()
    except ConnectionResetError:
        return b""


async def test_metrics_request_has_one_overall_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the deadline may end this request: header lines keep arriving, none too big.
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics, "MAX_HEADER_BYTES", 1 << 40)
    d = Daemon("source")
    server = await serve_metrics(d, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    closed = asyncio.create_task(_closed(r))  # b"" once the endpoint closes
    w.write(b"GET /metrics HTTP/1.1\r\n")
    sent = 0
    try:
        while not closed.done() and time.monotonic() - t0 < 60:
            w.write(b"X-Slow: %d\r\n" % sent)
            sent += 1
            await w.drain()  # paced by the endpoint's reading, not by a clock
    except ConnectionError:
        pass
    held = time.monotonic() - t0
    w.transport.abort()
    assert await asyncio.wait_for(closed, 10) == b"", "answered a request never finished"
    assert held < 60, f"a client sending header lines held the endpoint {held:.0f} s"
    assert sent > 1
    await d.close()


async def test_metrics_headers_are_bounded() -> None:
    d = Daemon("source")
    server = await serve_metrics(d, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    w.write(b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"y" * 1000 + b"\r\n")
    for _ in range(40):
        w.write(b"X-Big: " + b"y" * 1000 + b"\r\n")
    w.write(b"\r\n")
    try:
        await w.drain()
    except ConnectionError:
        pass  # closed while we were still sending: that is the refusal
    assert await asyncio.wait_for(_closed(r), 30) == b""  # closed, no answer
    w.close()
    # A normal scrape still works.
    r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await asyncio.wait_for(r.read(), 30)
    w.close()
    assert body.startswith(b"HTTP/1.1 200 OK") and b"bitmig_owned_bitmaps" in body
    await d.close()


async def test_metrics_refuses_a_non_loopback_address_unless_asked() -> None:
    d = Daemon("source")
    with pytest.raises(MetricsBindError, match="--insecure"):
        await serve_metrics(d, NOT_LOOPBACK, 0)
    with pytest.raises(MetricsBindError):
        await serve_metrics(d, "", 0)  # every address
    await d.close()


def test_cli_metrics_policy_matches_listen(tmp_path: Path) -> None:
    for cmd in (["dest", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")],
                ["source"]):
        out = subprocess.run([*BITMIG, *cmd, "--control", str(tmp_path / "c.sock"),
                              "--metrics", f"{NOT_LOOPBACK}:9"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "refusing to serve metrics" in out.stderr and "--insecure" in out.stderr


async def test_source_refuses_plain_tcp_to_a_non_loopback_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    async def no_network(host, port, **kw):
        tried.append(host)
        raise ConnectionRefusedError("not in tests")

    monkeypatch.setattr(asyncio, "open_connection", no_network)
    src = Daemon("source", options=MigrationOptions(connect_timeout=2, io_timeout=2))
    src.registry.add("n", "b", 1 << 30, 65536, 64)
    for host in (NOT_LOOPBACK, "example.org", "::ffff:192.0.2.1", ""):
        with pytest.raises(RegistryError, match="plain TCP") as ei:
            await src.migrate(host, 7800)
        assert ei.value.code == "bad_request"
    assert tried == []  # refused before any connection attempt
    # Loopback stays allowed, and --insecure allows the rest.
    assert not (await src.migrate("127.0.0.1", 9)).ok
    assert not (await src.migrate("localhost", 9)).ok
    src.insecure = True
    assert not (await src.migrate(NOT_LOOPBACK, 9)).ok
    assert tried == ["127.0.0.1", "localhost", NOT_LOOPBACK]


def test_cli_source_refuses_plain_tcp_to_a_non_loopback_host(tmp_path: Path) -> None:
    out = subprocess.run([*BITMIG, "source", "--create", "n/b", "--disk-size", "1G",
                          "--control", str(tmp_path / "c.sock"), "--migrate-to",
                          f"{NOT_LOOPBACK}:7800"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "plain TCP" in out.stderr and "--insecure" in out.stderr
