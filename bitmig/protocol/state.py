"""The protocol's state machine as two tables: the connection's and each bitmap's.

Both peers track the same states: a state is named by the frames exchanged so far.

A frame is allowed when its (sender, kind) has an entry for the current state; the
entry gives the next state. Everything else is an `unexpected` error.
"""

from __future__ import annotations

from enum import Enum

from bitmig.protocol.spec import Kind, Role  # Role is the wire's (spec); the tables use it


class ConnState(Enum):
    IDLE = "idle"  # nothing exchanged yet
    GREETED = "greeted"  # the source said hello; the destination's hello is due
    OPEN = "open"  # bitmaps may be started and streamed
    ENDING = "ending"  # the source said end; the destination's end is due
    CLOSED = "closed"  # both ends said end
    FAILED = "failed"  # a fatal error frame was sent or received


class BitmapState(Enum):
    STARTED = "started"  # start seen, ready not yet
    STREAMING = "streaming"  # ready seen: bits and zeroes flow
    COMPLETING = "completing"  # complete seen, ack not yet
    DONE = "done"  # acknowledged: the destination owns the bitmap
    FAILED = "failed"  # an error frame with this id was sent or received


S, D = Role.SOURCE, Role.DESTINATION

# (state, sender, kind) -> next connection state. OPEN frames about bitmaps stay OPEN.
CONNECTION: dict[tuple[ConnState, Role, Kind], ConnState] = {
    (ConnState.IDLE, S, Kind.HELLO): ConnState.GREETED,
    (ConnState.GREETED, D, Kind.HELLO): ConnState.OPEN,
    **{(ConnState.OPEN, S, k): ConnState.OPEN for k in (Kind.START, Kind.BITS, Kind.ZEROES,
                                                          Kind.SPANS, Kind.COMPLETE)},
    **{(ConnState.OPEN, D, k): ConnState.OPEN for k in (Kind.READY, Kind.ACK, Kind.MARK)},
    (ConnState.OPEN, S, Kind.MARK): ConnState.OPEN,
    (ConnState.OPEN, S, Kind.END): ConnState.ENDING,
    (ConnState.ENDING, D, Kind.END): ConnState.CLOSED,
}

# (bitmap state or None for an id never seen, sender, kind) -> next bitmap state.
BITMAP: dict[tuple[BitmapState | None, Role, Kind], BitmapState] = {
    (None, S, Kind.START): BitmapState.STARTED,
    (BitmapState.STARTED, D, Kind.READY): BitmapState.STREAMING,
    (BitmapState.STREAMING, S, Kind.BITS): BitmapState.STREAMING,
    (BitmapState.STREAMING, S, Kind.ZEROES): BitmapState.STREAMING,
    (BitmapState.STREAMING, S, Kind.SPANS): BitmapState.STREAMING,
    (BitmapState.STREAMING, S, Kind.COMPLETE): BitmapState.COMPLETING,
    (BitmapState.COMPLETING, D, Kind.ACK): BitmapState.DONE,
    **{(st, who, Kind.ERROR): BitmapState.FAILED
       for st in (BitmapState.STARTED, BitmapState.STREAMING, BitmapState.COMPLETING)
       for who in (S, D)},
}

OPEN_BITMAP_STATES = frozenset(
    {BitmapState.STARTED, BitmapState.STREAMING, BitmapState.COMPLETING}
)
