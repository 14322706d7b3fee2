"""One frozen dataclass per frame kind. Field names and order follow spec.FIELDS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from bitmig.protocol.spec import Kind


@dataclass(frozen=True, slots=True)
class Hello:
    KIND: ClassVar[Kind] = Kind.HELLO
    version: int
    min_version: int
    role: str
    caps: tuple[str, ...] = ()
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    KIND: ClassVar[Kind] = Kind.START
    id: int
    node: str
    name: str
    disk_size: int
    granularity: int
    chunk_size: int
    enabled: bool = True
    persistent: bool = False
    live: bool = True
    token: bytes | None = None  # present: a retry may resume what the destination holds


@dataclass(frozen=True, slots=True)
class Ready:
    KIND: ClassVar[Kind] = Kind.READY
    id: int
    have: Any = field(default=None, repr=False)  # encoded mask of chunks already held
    have_enc: int | None = None


@dataclass(frozen=True, slots=True)
class Bits:
    KIND: ClassVar[Kind] = Kind.BITS
    id: int
    first: int
    count: int
    enc: int
    data: Any = field(repr=False)  # bytes-like: bytes, memoryview


@dataclass(frozen=True, slots=True)
class Zeroes:
    KIND: ClassVar[Kind] = Kind.ZEROES
    id: int
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class Complete:
    KIND: ClassVar[Kind] = Kind.COMPLETE
    id: int
    digest: bytes
    count: int


@dataclass(frozen=True, slots=True)
class Ack:
    KIND: ClassVar[Kind] = Kind.ACK
    id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Error:
    KIND: ClassVar[Kind] = Kind.ERROR
    code: str
    message: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class End:
    KIND: ClassVar[Kind] = Kind.END


@dataclass(frozen=True, slots=True)
class Mark:
    KIND: ClassVar[Kind] = Kind.MARK
    seq: int


@dataclass(frozen=True, slots=True)
class Spans:
    """Many runs of chunks of one bitmap in one frame: `runs` is the encoded run list
    (bitmig.protocol.runs), `data` the runs' serialized bytes, concatenated and encoded
    as one payload. Sent only to a peer that announced spec.CAP_SPANS."""

    KIND: ClassVar[Kind] = Kind.SPANS
    id: int
    runs: bytes
    enc: int
    data: Any = field(repr=False)  # bytes-like: bytes, memoryview


@dataclass(frozen=True, slots=True)
class BitmapFailed:
    """Not a frame: a Connection reports that a frame from the peer broke one bitmap's
    rules (e.g. a payload that lies about its size). This side must report `error` for
    that bitmap (Connection.error_frame); the connection goes on. Given in order with
    the other events, after the events of the frames before it."""

    id: int
    code: str
    message: str


Event = Hello | Start | Ready | Bits | Zeroes | Complete | Ack | Error | End | Mark | Spans

# What Connection.receive_data returns: the peer's frames, and per-bitmap failures.
Received = Event | BitmapFailed

EVENT_TYPES: dict[Kind, type] = {
    cls.KIND: cls
    for cls in (Hello, Start, Ready, Bits, Zeroes, Complete, Ack, Error, End, Mark, Spans)
}
