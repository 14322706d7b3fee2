"""One end of a bitmig connection, sans-IO: bytes in, events out; events in, bytes out.

The Connection frames and validates everything that crosses it and enforces the
state tables of bitmig.protocol.state for both directions. It never touches a socket,
a clock or a bitmap; the daemons are thin adapters that move its bytes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from bitmig.protocol import geometry, spec
from bitmig.protocol.codec import HEAD_BYTES, decode_bits_head, decode_body, encode
from bitmig.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import (
    BitmapFailed,
    Bits,
    Error,
    Event,
    Hello,
    Received,
    Spans,
    Start,
    Zeroes,
)
from bitmig.protocol.runs import decode_runs, raw_bytes
from bitmig.protocol.spec import ErrorCode, Kind, Role
from bitmig.protocol.state import (
    BITMAP,
    CONNECTION,
    OPEN_BITMAP_STATES,
    BitmapState,
    ConnState,
)

# Called for every frame that crosses: (direction "send"/"recv", event, frame bytes).
FrameObserver = Callable[[str, Event, int], None]
# Asked where the payload of a checked bits frame should be received (see Connection.landing).
Landing = Callable[[Bits], "memoryview | None"]

LAND_MIN = 64 << 10  # payloads from this size on are received in place, not buffered
SCRATCH = 64 << 10  # receive_buffer's size between claimed payloads


@dataclass(slots=True)
class _Claim:
    """A bits frame whose head was decoded and checked; its payload is still arriving."""

    event: Bits
    view: memoryview  # exactly the payload's bytes
    filled: int
    frame_bytes: int  # prefix + body, for the counters


@dataclass(slots=True)
class BitmapGeometry:
    """What a start frame declared, as far as validation of later frames needs it."""

    start: Start
    serialized_size: int
    nchunks: int
    state: BitmapState = BitmapState.STARTED


def geometry_of(start: Start) -> BitmapGeometry:
    """Check a start frame's geometry against the limits; raise bad_field/limit."""
    size = geometry.serialized_size(start.disk_size, start.granularity)
    if size > spec.MAX_BITMAP_BYTES:
        raise RemoteProtocolError(
            ErrorCode.LIMIT,
            f"bitmap {start.node}/{start.name} would be {size} bytes, limit is "
            f"{spec.MAX_BITMAP_BYTES}",
            start.id,
        )
    return BitmapGeometry(start, size, geometry.chunk_count(size, start.chunk_size))


class Connection:
    """The protocol state of one connection, seen from `role`."""

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = spec.MAX_FRAME_BYTES,
        observer: FrameObserver | None = None,
    ) -> None:
        self.role = role
        self.state = ConnState.IDLE
        self.version: int | None = None
        self.peer_hello: Hello | None = None
        self.bitmaps: dict[int, BitmapGeometry] = {}
        self.max_frame = max_frame
        self.observer = observer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent: Counter[str] = Counter()  # by kind name
        self.frames_received: Counter[str] = Counter()
        self._buf = bytearray()
        self._pos = 0  # start of unparsed bytes in _buf
        # Receiving in place (receive_buffer/received_into): when set, a large bits
        # frame is decoded and checked from its head, then `landing(event)` names the
        # memory its payload belongs in (a writable byte view of exactly its size, handed
        # back as the event's data; None: a buffer of its own), and the payload is
        # received there, never copied through _buf.
        self.landing: Landing | None = None
        self._claim: _Claim | None = None
        self._scratch: memoryview | None = None
        self._into_claim = False  # what receive_buffer handed out last

    # -- receiving --------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Where the next bytes from the peer should be received (then call
        received_into): the rest of a claimed payload, or a scratch buffer."""
        if self._claim is not None:
            self._into_claim = True
            return self._claim.view[self._claim.filled :]
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH))
        self._into_claim = False
        return self._scratch

    def received_into(self, n: int) -> list[Received]:
        """`n` bytes were written at the start of the last receive_buffer(); like
        receive_data for them."""
        if not self._into_claim:
            assert self._scratch is not None
            return self.receive_data(self._scratch[:n])
        claim = self._claim
        assert claim is not None and n <= len(claim.view) - claim.filled
        claim.filled += n
        return [self._finish_claim()] if claim.filled == len(claim.view) else []

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Received]:
        """Feed bytes from the peer; return the events of every complete frame, in order.

        A frame that breaks one bitmap's rules is consumed and reported as a BitmapFailed
        event (the bitmap is FAILED; the caller sends its error frame and goes on).
        Raises RemoteProtocolError on the first fatal violation; the connection is then
        FAILED and the caller should send `error_frame(exc)` and close.
        """
        if self.state is ConnState.FAILED:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED, "data after the connection failed")
        events: list[Received] = []
        claim = self._claim
        if claim is not None:  # the rest of a claimed payload comes first
            with memoryview(data) as mv:
                k = min(mv.nbytes, len(claim.view) - claim.filled)
                claim.view[claim.filled : claim.filled + k] = mv.cast("B")[:k]
                claim.filled += k
                if claim.filled < len(claim.view):
                    return events
                events.append(self._finish_claim())
                if k == mv.nbytes:
                    return events
                self._buf += mv.cast("B")[k:]
        else:
            self._buf += data
        buf = self._buf
        prefix = spec.LENGTH_PREFIX.size
        try:
            while len(buf) - self._pos >= prefix:
                (n,) = spec.LENGTH_PREFIX.unpack_from(buf, self._pos)
                if n == 0 or n > self.max_frame:
                    raise RemoteProtocolError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"frame length {n} outside [1, {self.max_frame}]",
                    )
                end = self._pos + prefix + n
                if len(buf) < end:
                    if self.landing is not None and n >= LAND_MIN:
                        self._try_claim(n)
                    break
                with memoryview(buf) as mv:
                    event = decode_body(mv[self._pos + prefix : end])
                self._pos = end
                try:
                    self._check(event, self.role.peer, RemoteProtocolError)
                except ProtocolError as e:
                    if e.bitmap_id is None or e.code not in spec.BITMAP_ERRORS:
                        raise
                    # One bitmap's fault: its frame is consumed, the bitmap fails, the
                    # rest of the connection goes on.
                    geo = self.bitmaps.get(e.bitmap_id)
                    if geo is not None:
                        geo.state = BitmapState.FAILED
                    self.bytes_received += prefix + n
                    events.append(BitmapFailed(e.bitmap_id, str(e.code), e.message))
                    continue
                self._count_received(event, prefix + n)
                events.append(event)
        except ProtocolError:
            self.state = ConnState.FAILED
            raise
        finally:
            # Drop consumed bytes once they dominate, so the buffer stays bounded.
            if self._pos and (self._pos == len(buf) or self._pos > (1 << 20)):
                del buf[: self._pos]
                self._pos = 0
        return events

    def _count_received(self, event: Event, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.frames_received[event.KIND.name.lower()] += 1
        if self.observer:
            self.observer("recv", event, nbytes)

    def _try_claim(self, n: int) -> None:
        """The buffer holds the start of a large frame of body length n: when it is a bits
        frame that passes every check on its head, claim it (see `landing`). Otherwise
        nothing happens and the whole frame is buffered and decoded as usual, which
        reports the same errors."""
        buf, body = self._buf, self._pos + spec.LENGTH_PREFIX.size
        if len(buf) - body < min(n, HEAD_BYTES):
            return
        with memoryview(buf) as mv:
            head = decode_bits_head(mv[body : body + HEAD_BYTES], n)
        if head is None:
            return
        event, offset = head
        try:
            self._check(event, self.role.peer, RemoteProtocolError)
        except ProtocolError:
            return  # no state changed: the whole frame's decode reports it
        assert self.landing is not None
        size = n - offset
        view = self.landing(event)
        if view is None or view.nbytes != size or view.readonly or view.format != "B":
            view = memoryview(bytearray(size))
        have = len(buf) - (body + offset)
        with memoryview(buf) as mv:
            view[:have] = mv[body + offset :]
        self._pos = len(buf)
        self._claim = _Claim(event, view, have, spec.LENGTH_PREFIX.size + n)

    def _finish_claim(self) -> Bits:
        claim = self._claim
        assert claim is not None
        self._claim = None
        event = dataclasses.replace(claim.event, data=claim.view)
        self._count_received(event, claim.frame_bytes)
        return event

    def receive_eof(self) -> None:
        """The peer closed its side. Raises unless that was the protocol's end."""
        if self.buffered:
            self.state = ConnState.FAILED
            raise RemoteProtocolError(
                ErrorCode.TRUNCATED,
                f"stream ended inside a frame ({self.buffered} bytes buffered)",
            )
        if self.state not in (ConnState.CLOSED, ConnState.FAILED):
            state, self.state = self.state, ConnState.FAILED
            raise RemoteProtocolError(
                ErrorCode.CLOSED, f"peer closed the connection in state {state.value}"
            )

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        claim = self._claim
        return len(self._buf) - self._pos + (claim.filled if claim is not None else 0)

    # -- sending ----------------------------------------------------------------------

    def send(self, event: Event) -> list[bytes | memoryview]:
        """Validate an event this side wants to send; return the frame's buffers."""
        self._check(event, self.role, LocalProtocolError)
        return self._emit(event)

    def _emit(self, event: Event) -> list[bytes | memoryview]:
        out = encode(event)
        n = sum(memoryview(b).nbytes for b in out)
        self.bytes_sent += n
        self.frames_sent[event.KIND.name.lower()] += 1
        if self.observer:
            self.observer("send", event, n)
        return out

    def error_frame(self, exc: ProtocolError) -> list[bytes | memoryview]:
        """The error frame that reports `exc` to the peer (fatal unless it names a bitmap)."""
        bitmap_id = exc.bitmap_id if exc.code in spec.BITMAP_ERRORS else None
        event = Error(str(exc.code), exc.message[: spec.MAX_MESSAGE_BYTES // 4], bitmap_id)
        # Not through send(): reporting an error must work in any state, even for an id the
        # state machine never accepted (e.g. `limit` on one start too many).
        out = self._emit(event)
        if bitmap_id is None:
            self.state = ConnState.FAILED
        elif bitmap_id in self.bitmaps:
            self.bitmaps[bitmap_id].state = BitmapState.FAILED
        return out

    # -- the state machine --------------------------------------------------------------

    def _check(self, event: Event, sender: Role, err: type[ProtocolError]) -> None:
        kind = event.KIND
        if kind is Kind.ERROR:
            self._on_error(event, sender, err)
            return
        key = (self.state, sender, kind)
        if key not in CONNECTION:
            raise err(
                ErrorCode.UNEXPECTED,
                f"{sender.value} may not send {kind.name.lower()} in state {self.state.value}",
            )
        if kind is Kind.HELLO:
            self._on_hello(event, sender, err)
        elif kind is Kind.MARK:
            pass  # no bitmap involved; the destination echoes it when it gets there
        elif kind is Kind.END:
            busy = [i for i, g in self.bitmaps.items() if g.state in OPEN_BITMAP_STATES]
            if busy:
                raise err(ErrorCode.UNEXPECTED, f"end while bitmaps {busy[:8]} are unfinished")
        else:
            self._on_bitmap_frame(event, sender, err)
        self.state = CONNECTION[key]

    def _on_hello(self, hello: Hello, sender: Role, err: type[ProtocolError]) -> None:
        if hello.role != sender:
            raise err(ErrorCode.BAD_FIELD, f"hello.role is {hello.role!r}, expected "
                                           f"{sender.value!r}")
        if hello.min_version > hello.version:
            raise err(ErrorCode.BAD_FIELD, "hello.min_version exceeds hello.version")
        if sender is self.role:
            if sender is Role.DESTINATION:  # the answer names the version chosen
                self.version = hello.version
            return
        self.peer_hello = hello
        common = min(hello.version, spec.PROTOCOL_VERSION)
        if common < max(hello.min_version, spec.MIN_PROTOCOL_VERSION):
            raise err(
                ErrorCode.VERSION,
                f"peer speaks versions {hello.min_version}..{hello.version}, this side "
                f"{spec.MIN_PROTOCOL_VERSION}..{spec.PROTOCOL_VERSION}",
            )
        if sender is Role.DESTINATION and hello.version > spec.PROTOCOL_VERSION:
            raise err(ErrorCode.VERSION, f"destination chose version {hello.version}, "
                                         f"this side speaks up to {spec.PROTOCOL_VERSION}")
        self.version = common

    def _on_error(self, error: Error, sender: Role, err: type[ProtocolError]) -> None:
        if error.id is None:
            self.state = ConnState.FAILED
            return
        if self.state is not ConnState.OPEN:
            raise err(ErrorCode.UNEXPECTED, f"error for bitmap {error.id} in state "
                                            f"{self.state.value}")
        geo = self.bitmaps.get(error.id)
        if geo is None:
            raise err(ErrorCode.UNKNOWN_BITMAP, f"error names bitmap id {error.id}, never started",
                      error.id)
        if geo.state is not BitmapState.FAILED:  # both sides may fail the same bitmap
            geo.state = BITMAP.get((geo.state, sender, Kind.ERROR), geo.state)

    def _on_bitmap_frame(self, event: Event, sender: Role, err: type[ProtocolError]) -> None:
        bid = event.id
        kind = event.KIND
        geo = self.bitmaps.get(bid)
        if kind is Kind.START:
            if geo is not None:
                raise err(ErrorCode.DUPLICATE_ID, f"bitmap id {bid} was already started")
            if len(self.bitmaps) >= spec.MAX_BITMAPS:
                raise err(ErrorCode.LIMIT, f"more than {spec.MAX_BITMAPS} bitmaps on one "
                                           "connection")
            geo = geometry_of(event)  # may raise limit before anything is allocated
            self.bitmaps[bid] = geo
            return
        if geo is None:
            raise err(ErrorCode.UNKNOWN_BITMAP, f"{kind.name.lower()} names bitmap id {bid}, "
                                                "never started")
        if geo.state is BitmapState.FAILED:
            return  # frames already in flight when the bitmap failed: dropped by the caller
        nxt = BITMAP.get((geo.state, sender, kind))
        if nxt is None:
            raise err(
                ErrorCode.UNEXPECTED,
                f"{sender.value} may not send {kind.name.lower()} for bitmap {bid} in state "
                f"{geo.state.value}",
            )
        if kind in (Kind.BITS, Kind.ZEROES):
            self._check_range(event, geo, err)
        elif kind is Kind.SPANS:
            self._check_spans(event, geo, sender, err)
        geo.state = nxt

    def peer_has(self, cap: str) -> bool:
        """The peer announced capability `cap` in its hello."""
        return self.peer_hello is not None and cap in self.peer_hello.caps

    def _check_spans(self, event: Spans, geo: BitmapGeometry, sender: Role,
                     err: type[ProtocolError]) -> None:
        if sender is self.role and not self.peer_has(spec.CAP_SPANS):
            raise err(ErrorCode.UNEXPECTED, f"spans frame to a peer without {spec.CAP_SPANS!r}")
        firsts, counts = decode_runs(event.runs)  # well-formed: the codec checked it
        end = int(firsts[-1] + counts[-1])
        if end > geo.nchunks:
            raise err(ErrorCode.CHUNK_RANGE, f"spans run ends at chunk {end}, outside "
                                             f"[0, {geo.nchunks}) of bitmap {event.id}")
        raw = raw_bytes(firsts, counts, geo.serialized_size, geo.start.chunk_size)
        self._check_payload(event, raw, "spans", err)

    def _check_range(self, event: Bits | Zeroes, geo: BitmapGeometry,
                     err: type[ProtocolError]) -> None:
        first, count = event.first, event.count
        if first >= geo.nchunks or count > geo.nchunks - first:
            raise err(ErrorCode.CHUNK_RANGE, f"chunks [{first}, {first + count}) outside "
                                             f"[0, {geo.nchunks}) of bitmap {event.id}")
        if type(event) is not Bits:
            return
        raw = geometry.chunk_bytes(geo.serialized_size, geo.start.chunk_size, first, count)
        self._check_payload(event, raw, "bits", err)

    @staticmethod
    def _check_payload(event: Bits | Spans, raw: int, kind: str,
                       err: type[ProtocolError]) -> None:
        """The frame's raw bytes within the frame limit, its payload within them. Only the
        bound here (nothing longer than the chunks is ever buffered or inflated); the exact
        length of a raw payload, zlib or not, is checked once, by encodings.decode, where
        the decoded bytes exist."""
        if raw > spec.MAX_FRAME_PAYLOAD:
            raise err(ErrorCode.CHUNK_RANGE, f"{kind} frame covers {raw} bytes, limit is "
                                             f"{spec.MAX_FRAME_PAYLOAD}")
        n = memoryview(event.data).nbytes
        if n > raw:
            raise err(ErrorCode.BAD_PAYLOAD, f"encoded payload of {n} bytes exceeds the "
                                             f"{raw} raw bytes it stands for", event.id)

    def bitmap_state(self, bitmap_id: int) -> BitmapState | None:
        geo = self.bitmaps.get(bitmap_id)
        return geo.state if geo else None
