"""The asyncio adapter around a sans-IO Connection: a socket, timeouts, tracing."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from bitmig.core import defaults
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.connection import Connection, Landing
from bitmig.protocol.errors import PeerError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Bits, Error, Event, Received
from bitmig.protocol.spec import ErrorCode
from bitmig.protocol.state import Role


def peer_name(writer: asyncio.StreamWriter) -> str:
    """HOST:PORT of the other end, as logs and traces name it."""
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class Timeout(Exception):
    """A wait for the peer expired; the message names the wait."""


BACKLOG = 2  # events parsed but not taken by recv() before reading pauses


class _Intake(asyncio.BufferedProtocol):
    """Receives a connection's bytes straight into the Connection's buffers (asyncio hands
    get_buffer's memory to recv_into): a claimed bits payload lands where it belongs
    without a copy. Replaces the stream's protocol, forwarding what the StreamWriter
    still needs (flow control of writes, the end of the connection) to it."""

    def __init__(self, ch: Channel, stream: asyncio.BaseProtocol) -> None:
        self.ch = ch
        self.stream = stream

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.ch.conn.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.ch._take(lambda: self.ch.conn.received_into(nbytes))

    def eof_received(self) -> bool | None:
        self.ch._ended(None)
        return self.stream.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ch._ended(exc)
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Channel:
    """Frames over one stream connection, validated by a Connection.

    Bytes are received by an _Intake that takes over the stream's transport; reading
    pauses while parsed events wait for an owner busy elsewhere, so a slow consumer holds
    at most a few reads' worth of frames, and a payload only lands (see `landing`) while the
    owner waits in recv() for the next frame, every earlier frame fully handled.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        trace: Trace,
        io_timeout: float = defaults.IO_TIMEOUT,
    ) -> None:
        self.writer = writer
        self.peer = peer_name(writer)
        self.trace = trace
        self.conn = Connection(role, observer=self._observe if trace.enabled else None)
        self.conn.landing = self._landing
        self.landing: Landing | None = None  # the owner's: where a bits payload belongs
        self.io_timeout = io_timeout
        self._events: deque[Received] = deque()
        self._failure: ProtocolError | None = None  # raised once the events before it
        self._end: BaseException | None = None  # EOF (a RemoteProtocolError) or loss
        self._waiter: asyncio.Future[None] | None = None
        self._waiting = False
        self._paused = False
        self.transport = writer.transport
        # What the stream reader received before the takeover is parsed first.
        # (StreamReader keeps it in _buffer: no public way to take it without a wait.)
        early = bytes(reader._buffer)
        reader._buffer.clear()
        self.transport.set_protocol(_Intake(self, self.transport.get_protocol()))
        if early:
            self._take(lambda: self.conn.receive_data(early))
        if reader.at_eof() or self.transport.is_closing():
            self._ended(reader.exception())
        else:
            self.transport.resume_reading()  # the reader may have paused at its limit

    def _observe(self, direction: str, event: Event, nbytes: int) -> None:
        self.trace.frame(direction, self.peer, event, nbytes)

    def _landing(self, event: Bits) -> memoryview | None:
        if self.landing is None or not self._waiting or self._events:
            return None
        return self.landing(event)

    def _take(self, parse) -> None:
        """Run a parse of received bytes; queue its events (or its error)."""
        if self._failure is not None or self._end is not None:
            return
        try:
            self._events.extend(parse())
        except ProtocolError as e:
            self._failure = e
        if self._events or self._failure is not None:
            # Pausing costs two epoll calls: only while the owner is busy elsewhere (it
            # is awaiting something) or a second event is queued (TLS may read again
            # before the owner runs), so queued frames stay as few as StreamReader's
            # limit kept them. Waiting in recv(), the owner takes the event first.
            if not self._waiting or len(self._events) >= BACKLOG or self._failure:
                self._pause()
            self._wake()

    def _ended(self, exc: BaseException | None) -> None:
        if self._end is None:
            self._end = exc if exc is not None else EOFError()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _pause(self) -> None:
        if not self._paused and not self.transport.is_closing():
            self.transport.pause_reading()
            self._paused = True

    def _resume(self) -> None:
        if self._paused and not self.transport.is_closing():
            self.transport.resume_reading()
        self._paused = False

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
            if self._failure is not None:
                raise self._failure
            if self._end is not None:
                if isinstance(self._end, EOFError):
                    self.conn.receive_eof()
                    raise RemoteProtocolError(ErrorCode.CLOSED, f"connection closed while "
                                                                f"waiting for {what}")
                if isinstance(self._end, OSError):
                    raise self._end
                raise ConnectionResetError(str(self._end))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"timed out after {limit:g}s waiting for {what}")
            # The future itself, not wait_for: wait_for wakes this task one loop turn
            # later, when the next frame's head was often read already (and could not
            # land, the event before it not taken yet).
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(left, _expire, waiter)
            self._waiting = True
            self._resume()
            try:
                await waiter
            except TimeoutError:
                raise Timeout(f"timed out after {limit:g}s waiting for {what}") from None
            finally:
                timer.cancel()
                self._waiting = False
                self._waiter = None
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
