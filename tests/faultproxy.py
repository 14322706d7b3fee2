"""A fault-injecting TCP proxy for tests (asyncio, 127.0.0.1 only).

Between a source and a destination it forwards bytes both ways and can:
- cut the connection after exactly N bytes in one direction ("up": source to
  destination, "down": destination to source), closing both sides;
- throttle the upstream (the destination reads slowly);
- call a hook before forwarding each piece (tests kill processes from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

Hook = Callable[[str, int, bytes], None]  # (direction, bytes forwarded so far, next piece)


class FaultProxy:
    def __init__(self, target_port: int, *, cut_after: int | None = None,
                 direction: str = "up", up_rate: float | None = None,
                 hook: Hook | None = None, read_size: int = 64 << 10) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.direction = direction
        self.up_rate = up_rate  # bytes per second, upstream
        self.hook = hook
        self.read_size = read_size
        self.forwarded = {"up": 0, "down": 0}
        self.cut = False
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Anything but a closed connection that stopped a pump (a failing hook, a bug
        # here): close() raises it, so the test fails with it rather than a timeout.
        self.errors: list[BaseException] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self.errors:
            raise self.errors[0]

    def _abort_all(self) -> None:
        for w in self._writers:
            w.transport.abort()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.transport.abort()
            return
        self._writers += [cw, uw]
        up = asyncio.ensure_future(self._pump("up", cr, uw))
        down = asyncio.ensure_future(self._pump("down", ur, cw))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            # One side is done: let the other flush for a moment, then close both.
            await asyncio.wait({up, down}, timeout=0.5)
        finally:
            for t in (up, down):
                t.cancel()
                self._tasks.discard(t)
            for w in (cw, uw):
                w.transport.abort()

    async def _pump(self, direction: str, r: asyncio.StreamReader,
                    w: asyncio.StreamWriter) -> None:
        try:
            await self._forward(direction, r, w)
        except ConnectionError:
            pass  # a cut, or a peer that went away: how a forwarding ends
        except Exception as e:
            self.errors.append(e)
            raise

    async def _forward(self, direction: str, r: asyncio.StreamReader,
                       w: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        while True:
            data = await r.read(self.read_size)
            if not data:
                with contextlib.suppress(OSError):
                    if w.can_write_eof():
                        w.write_eof()
                return
            if self.hook is not None:
                self.hook(direction, self.forwarded[direction], data)
            if self.cut_after is not None and direction == self.direction:
                room = self.cut_after - self.forwarded[direction]
                if room <= len(data):
                    if room > 0:
                        w.write(data[:room])
                        self.forwarded[direction] += room
                        # Those bytes leave before the cut: drain to an empty buffer.
                        w.transport.set_write_buffer_limits(0)
                        await w.drain()
                    self.cut = True
                    self._abort_all()  # both sides see the connection reset
                    return
            w.write(data)
            self.forwarded[direction] += len(data)
            await w.drain()
            if direction == "up" and self.up_rate:
                due = t0 + self.forwarded["up"] / self.up_rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
