"""A rate-limited TCP proxy on loopback: a token bucket on the source -> destination way."""

from __future__ import annotations

import asyncio
import socket
import time


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class RateLimitProxy:
    """Forwards one port to (host, port); upstream bytes limited to `rate` bytes/s.

    The receive buffer of the accepted socket is kept small (64 KiB) so that, as on a
    real slow link, the sender's own buffers (not the proxy's) hold the backlog.
    """

    def __init__(self, host: str, port: int, rate: float, burst: int = 16 * 1024) -> None:
        self.target = (host, port)
        self.bucket = TokenBucket(rate, burst)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server:
            self.server.close()
        if self.tasks:  # both ends close after the migration: let the pumps see EOF
            _, late = await asyncio.wait(self.tasks, timeout=2)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sock = cw.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        ur, uw = await asyncio.open_connection(*self.target)
        t = asyncio.current_task()
        if t is not None:
            self.tasks.add(t)
        try:
            await asyncio.gather(self._pump(cr, uw, True), self._pump(ur, cw, False))
        except asyncio.CancelledError:
            pass  # closed by close(): nothing left to forward
        finally:
            for w in (uw, cw):
                w.close()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    limited: bool) -> None:
        try:
            while data := await r.read(self.bucket.burst):
                if limited:
                    await self.bucket.take(len(data))
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            w.close()
