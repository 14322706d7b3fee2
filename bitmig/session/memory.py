"""A destination endpoint entirely in memory: a Connection and the real
DestinationSession, whose actions are carried out at once with no files, threads or
target. The fuzzer, the conformance vectors and their generator replay a destination
through it, so they exercise the same decisions as a running daemon."""

from __future__ import annotations

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Error, Event, Received, Start
from bitmig.protocol.state import ConnState, Role
from bitmig.session import destination as ds


class MemoryDestination:
    """Bytes from a source in; frames out (`sent`), per-bitmap refusals (`refused`) and
    verified bitmaps (`owned`) recorded."""

    def __init__(self, memory_budget: int = 1 << 30, now: float = 0.0,
                 hold: bool = False) -> None:
        self.conn = Connection(Role.DESTINATION)
        self.intake = ds.Intake(memory_budget, durable=False)
        self.session = ds.DestinationSession(self.intake, self, "memory")
        self.owned: dict[tuple[str, str], DirtyBitmap] = {}
        self.sent: list[Event] = []
        self.refused: list[ds.Refuse] = []
        self.now = now
        self.closed = False
        # hold: frames the session sends wait in `held` until release(), as if the I/O
        # before them were slow (a vector may show the state before `ready` goes out).
        self.hold = hold
        self.held: list[Event] = []

    # StoredBitmaps: what this endpoint owns
    def holds(self, node: str, name: str) -> bool:
        return (node, name) in self.owned

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        return None

    def receive(self, data: bytes) -> list[Received]:
        """Feed bytes; return the Connection's events (each already handled). A fatal
        error raises RemoteProtocolError after the session discarded everything."""
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as e:
            self.fail(e)
            raise
        for ev in events:
            if type(ev) is Error and ev.id is None:  # the source gave up: a cut
                self.close(cut=True)
                break
            self._run(self.session.handle(ev, self.now))
        return events

    def receive_eof(self) -> None:
        """The source closed. Raises RemoteProtocolError unless the protocol had ended."""
        try:
            self.conn.receive_eof()
        finally:
            self.close(cut=True)

    def fail(self, exc: ProtocolError) -> None:
        """A fatal error found here: report it and discard the connection's bitmaps."""
        self.conn.error_frame(exc)
        self.close(cut=False)

    def close(self, cut: bool) -> None:
        if not self.closed:
            self.closed = True
            self._run(self.session.close(self.now, cut))

    def release(self) -> Event:
        """Send the oldest held frame; return it."""
        ev = self.held.pop(0)
        self._send(ev)
        return ev

    def _send(self, ev: Event) -> None:
        if self.conn.state is ConnState.FAILED:
            return  # a fatal error frame from the source came in the same read: mute
        self.conn.send(ev)  # the state machine checks what the session sends
        self.sent.append(ev)

    def _run(self, actions: list[ds.Action]) -> None:
        for a in actions:
            t, done = type(a), None
            if t is ds.Send:
                if self.hold:
                    self.held.append(a.event)
                else:
                    self._send(a.event)
            elif t is ds.Refuse:
                self.conn.error_frame(RemoteProtocolError(a.code, a.message, a.id))
                self.refused.append(a)
            elif t is ds.Allocate:
                done = ds.Allocated(a.id, Assembly.replacing(a.start, a.base))
            elif t is ds.Own:
                self.owned[(a.meta.node, a.meta.name)] = a.bitmap
            elif t is ds.Sync:
                done = ds.Synced(a.id)
            if done is not None:
                self._run(self.session.handle(done, self.now))
