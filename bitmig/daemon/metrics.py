"""Prometheus metrics for a daemon: `bitmig source|dest --metrics HOST:PORT`.

Plain asyncio HTTP, text exposition format 0.0.4, no dependency. Counters are fed by
wrapping the daemon's Trace (every Channel reports each frame to its trace, and the
migration and receiver report phases, passes and outcomes as trace events), so the
wrapper also works when no trace file is written. Gauges of a running migration are
read from the daemon when scraped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.events import Event

if TYPE_CHECKING:
    from bitmig.daemon.service import Daemon

PHASES = ("setup", "bulk", "dirty", "completion", "done")


class MetricsTrace(Trace):
    """A Trace that counts what passes through it, then hands it to the real trace."""

    def __init__(self, inner: Trace) -> None:
        self.side = inner.side
        self._f = None
        self.inner = inner
        self.frames: Counter[tuple[str, str]] = Counter()  # (dir, kind)
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.migrations: Counter[str] = Counter()  # by state
        self.phase = ""
        self.pass_no = 0
        self.pending_bytes = 0
        self.last_downtime_ms: float | None = None
        self.started = time.time()

    @property
    def enabled(self) -> bool:  # Channels then always report frames
        return True

    def frame(self, direction: str, peer: str, event: Event, nbytes: int) -> None:
        key = (direction, event.KIND.name.lower())
        self.frames[key] += 1
        self.bytes[key] += nbytes
        self.inner.frame(direction, peer, event, nbytes)

    def event(self, type_: str, **fields: Any) -> None:
        if type_ in ("migration", "connection"):
            self.migrations["running"] += 1
            self.phase, self.pass_no = "setup", 0
        elif type_ == "outcome":
            self.migrations["running"] -= 1
            self.migrations["succeeded" if fields.get("ok") else "failed"] += 1
            if fields.get("downtime_ms"):
                self.last_downtime_ms = fields["downtime_ms"]
        elif type_ == "error" and self.side == "destination" and fields.get("code") != "tls":
            # A connection that failed after it began (a failed TLS handshake never began).
            self.migrations["running"] -= 1
            self.migrations["failed"] += 1
        elif type_ == "phase":
            self.phase = fields["phase"]
            if "downtime_ms" in fields:
                self.last_downtime_ms = fields["downtime_ms"]
        elif type_ == "pass":
            self.pass_no = fields["n"]
        if "pending_bytes" in fields:
            self.pending_bytes = fields["pending_bytes"]
        self.inner.event(type_, **fields)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def install(daemon: Daemon) -> MetricsTrace:
    """Wrap the daemon's trace (once); migrations and connections started later use it."""
    if not isinstance(daemon.trace, MetricsTrace):
        daemon.trace = MetricsTrace(daemon.trace)
    return daemon.trace


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(daemon: Daemon) -> str:
    m = install(daemon)
    out: list[str] = []

    def metric(name: str, typ: str, help_: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        out.append(f"# HELP bitmig_{name} {help_}")
        out.append(f"# TYPE bitmig_{name} {typ}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{_esc(str(x))}"' for k, x in labels.items())
            out.append(f"bitmig_{name}{{{lab}}} {v}" if lab else f"bitmig_{name} {v}")

    side = {"side": daemon.side}
    metric("frames_sent_total", "counter", "Frames sent, by kind.",
           [({**side, "kind": k}, n) for (d, k), n in sorted(m.frames.items()) if d == "send"])
    metric("frames_received_total", "counter", "Frames received, by kind.",
           [({**side, "kind": k}, n) for (d, k), n in sorted(m.frames.items()) if d == "recv"])
    metric("bytes_sent_total", "counter", "Frame bytes sent (length prefix included), by kind.",
           [({**side, "kind": k}, n) for (d, k), n in sorted(m.bytes.items()) if d == "send"])
    metric("bytes_received_total", "counter", "Frame bytes received, by kind.",
           [({**side, "kind": k}, n) for (d, k), n in sorted(m.bytes.items()) if d == "recv"])
    states = ("running", "succeeded", "failed")
    metric("migrations", "gauge", "Migrations (source) or incoming connections (destination) "
           "by state; succeeded and failed count since start.",
           [({**side, "state": s}, max(0, m.migrations[s])) for s in states])
    active = daemon.active_migration
    phase = active.phase if active is not None else m.phase
    metric("phase", "gauge", "1 for the phase of the current (or last) migration.",
           [({**side, "phase": p}, int(p == phase)) for p in PHASES])
    metric("pass", "gauge", "Dirty pass of the current (or last) migration.",
           [(side, active.pass_no if active is not None else m.pass_no)])
    pending = m.pending_bytes
    if active is not None:
        try:
            pending = active._pending()
        except Exception:  # a scrape must never disturb the migration
            pass
    metric("pending_dirty_bytes", "gauge", "Serialized bytes of dirty chunks not yet sent.",
           [(side, pending)])
    if m.last_downtime_ms is not None:
        metric("last_downtime_seconds", "gauge", "Frozen window of the last completed "
               "migration.", [(side, round(m.last_downtime_ms / 1000, 6))])
    metric("errors_total", "counter", "Protocol errors by code.",
           [({**side, "code": c}, n) for c, n in sorted(daemon.errors.items())])
    metric("connections_open", "gauge", "Incoming connections being served.",
           [(side, sum(daemon.connections.values()))])
    metric("connections_refused_total", "counter", "Incoming connections closed at accept "
           "because a cap was reached, by cap (total, per_peer).",
           [({**side, "reason": r}, daemon.refused_connections[r])
            for r in ("total", "per_peer")])
    metric("owned_bitmaps", "gauge", "Bitmaps registered on this daemon.",
           [(side, len(daemon.registry.entries))])
    metric("start_time_seconds", "gauge", "When metrics collection started (Unix time).",
           [(side, round(m.started, 3))])
    return "\n".join(out) + "\n"


REQUEST_TIMEOUT = 5.0  # seconds for a whole request (line and headers), not per line
MAX_HEADER_BYTES = 16 * 1024  # request line and headers together


class MetricsBindError(ValueError):
    """--metrics names a non-loopback address and plain HTTP there was not asked for."""


async def _read_request(r: asyncio.StreamReader) -> bytes:
    """The request line, after reading the headers up to the blank line. Raises
    TimeoutError past REQUEST_TIMEOUT overall and ValueError past MAX_HEADER_BYTES."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        line = await r.readline()
        total = len(line)
        while (h := await r.readline()) not in (b"\r\n", b"\n", b""):
            total += len(h)
            if total > MAX_HEADER_BYTES:
                raise ValueError("request headers too large")
    return line


async def serve_metrics(daemon: Daemon, host: str, port: int,
                        allow_public: bool = False) -> asyncio.AbstractServer:
    """Serve GET /metrics (any path) on host:port; returns the server. Like --listen,
    a non-loopback address needs allow_public (--insecure): the endpoint is plain,
    unauthenticated HTTP. Raises MetricsBindError otherwise."""
    from bitmig.daemon.service import is_loopback

    if not is_loopback(host) and not allow_public:
        raise MetricsBindError(f"refusing to serve metrics on {host or 'every address'} (not "
                               "loopback); pass --insecure to allow plain HTTP there")
    install(daemon)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await _read_request(r)
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "only GET\n"
            elif parts[1].split("?")[0] not in ("/", "/metrics"):
                status, body = "404 Not Found", "try /metrics\n"
            else:
                status, body = "200 OK", render(daemon)
            data = body.encode()
            w.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; "
                    f"charset=utf-8\r\nContent-Length: {len(data)}\r\nConnection: close"
                    f"\r\n\r\n".encode() + (data if parts[:1] != ["HEAD"] else b""))
            await w.drain()
        except (OSError, TimeoutError, ValueError):  # ValueError: line or headers too long
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, host, port)
    daemon._servers.append(server)  # closed with the daemon
    return server
