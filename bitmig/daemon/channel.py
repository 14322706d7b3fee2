"""The asyncio adapter around a sans-IO Connection: a socket, timeouts, tracing."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from bitmig.core import defaults
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import PeerError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Error, Event, Received
from bitmig.protocol.spec import ErrorCode
from bitmig.protocol.state import Role

READ_SIZE = 4 << 20


def peer_name(writer: asyncio.StreamWriter) -> str:
    """HOST:PORT of the other end, as logs and traces name it."""
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class Timeout(Exception):
    """A wait for the peer expired; the message names the wait."""


class Channel:
    """Frames over one stream connection, validated by a Connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        trace: Trace,
        io_timeout: float = defaults.IO_TIMEOUT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer_name(writer)
        self.trace = trace
        self.conn = Connection(role, observer=self._observe if trace.enabled else None)
        self.io_timeout = io_timeout
        self._events: deque[Received] = deque()

    def _observe(self, direction: str, event: Event, nbytes: int) -> None:
        self.trace.frame(direction, self.peer, event, nbytes)

    def write(self, event: Event) -> None:
        """Queue a frame; payload views are copied into the transport before this returns."""
        # One write per buffer: writelines would join header and payload into a new
        # bytes object (a full copy of every payload) before sending.
        for buf in self.conn.send(event):
            self.writer.write(buf)

    async def drain(self, what: str = "the peer to accept data") -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), self.io_timeout)
        except TimeoutError:
            raise Timeout(f"timed out after {self.io_timeout:g}s waiting for {what}") from None

    async def send(self, event: Event) -> None:
        self.write(event)
        await self.drain()

    async def recv(self, what: str, timeout: float | None = None) -> Received:
        """The next event from the peer (a BitmapFailed too: this side must report that
        bitmap's error). Error frames raise PeerError."""
        limit = self.io_timeout if timeout is None else timeout
        # One deadline for the whole frame, not per read: a peer trickling a byte at a
        # time must not hold the connection (and a partial-frame buffer) forever.
        deadline = time.monotonic() + limit
        while not self._events:
            try:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), left)
            except TimeoutError:
                raise Timeout(f"timed out after {limit:g}s waiting for {what}") from None
            if not data:
                self.conn.receive_eof()
                raise RemoteProtocolError(ErrorCode.CLOSED, f"connection closed while waiting "
                                                            f"for {what}")
            self._events.extend(self.conn.receive_data(data))
        event = self._events.popleft()
        if type(event) is Error:
            raise PeerError(event.code, event.message, event.id)
        return event

    async def fail(self, exc: ProtocolError) -> None:
        """Tell the peer what went wrong (best effort) and close."""
        try:
            self.writer.writelines(self.conn.error_frame(exc))
            await asyncio.wait_for(self.writer.drain(), 2)
        except (OSError, TimeoutError, ProtocolError):
            pass
        await self.close()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass
