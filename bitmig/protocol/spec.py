"""The bitmig wire protocol in one table: frame kinds, fields, encodings, error codes, limits.

This module is the single source of truth for every protocol fact. proto/PROTOCOL.md
documents it and tests/test_spec_sync.py fails when the two disagree; the conformance
vectors in proto/vectors/ are checked against it too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

# -- versions -------------------------------------------------------------------------

PROTOCOL_VERSION = 1  # highest version this code speaks
MIN_PROTOCOL_VERSION = 1  # lowest version this code speaks

# -- framing --------------------------------------------------------------------------

LENGTH_PREFIX = struct.Struct(">I")  # 4-byte big-endian body length

# -- limits (checked before any allocation) ---------------------------------------------

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MAX_FRAME_PAYLOAD = 4 * MiB  # decoded bytes one bits frame may cover (count * chunk_size)
MAX_FRAME_BYTES = MAX_FRAME_PAYLOAD + 64 * KiB  # largest msgpack body after the prefix
MAX_BITMAP_BYTES = 4 * GiB  # serialized size of one bitmap
MAX_BITMAPS = 1024  # bitmaps started on one connection
MAX_NAME_BYTES = 1023  # node and bitmap names, UTF-8 bytes (QEMU's bitmap name limit)
MAX_MESSAGE_BYTES = 4096  # error message text
MAX_CAPS = 32  # capabilities in hello
MAX_CAP_BYTES = 64
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
MIN_CHUNK_SIZE = 8  # one 64-bit word: the serialized form is word based
MAX_CHUNK_SIZE = MiB
DIGEST_BYTES = 32
DIGEST_BLOCK = 16 * KiB  # serialized bytes per leaf of the tree digest (BLAKE3)
MAX_ID = (1 << 32) - 1
TOKEN_BYTES = 16  # a migration's resume token: the same on every retry of that bitmap
MAX_U64 = (1 << 64) - 1
MAX_SPAN_RUNS = 4096  # (first, count) runs one spans frame may carry
MAX_VARINT_BYTES = 5  # LEB128 numbers of payloads and run lists: at most 35 bits
MAX_RUNS_BYTES = MAX_SPAN_RUNS * 2 * MAX_VARINT_BYTES  # the spans frame's `runs` field


class Kind(IntEnum):
    """Frame kinds (the `kind` field)."""

    HELLO = 1
    START = 2
    READY = 3
    BITS = 4
    ZEROES = 5
    COMPLETE = 6
    ACK = 7
    ERROR = 8
    END = 9
    MARK = 10
    SPANS = 11  # only to a peer that announced CAP_SPANS (section 4)


class Encoding(IntEnum):
    """Payload encodings of a bits frame (the `enc` field).

    The low nibble names the base encoding; ZLIB (0x10) may be or-ed onto any of them,
    meaning the base encoding's bytes were compressed with zlib (RFC 1950).
    """

    RAW = 0  # the serialized words of the chunks, verbatim
    POSITIONS = 1  # LEB128 gaps between set bits
    RUNS = 2  # LEB128 lengths of alternating clear/set runs, starting with clear
    ZLIB = 0x10


BASE_ENCODINGS = (Encoding.RAW, Encoding.POSITIONS, Encoding.RUNS)
VALID_ENCODINGS = frozenset(
    int(b) | z for b in BASE_ENCODINGS for z in (0, int(Encoding.ZLIB))
)


class ErrorCode(StrEnum):
    """Error codes carried by error frames and raised as ProtocolError.code."""

    TRUNCATED = "truncated"
    FRAME_TOO_LARGE = "frame_too_large"
    MALFORMED = "malformed"
    UNKNOWN_KIND = "unknown_kind"
    BAD_FIELD = "bad_field"
    VERSION = "version"
    UNEXPECTED = "unexpected"
    UNKNOWN_BITMAP = "unknown_bitmap"
    DUPLICATE_ID = "duplicate_id"
    CHUNK_RANGE = "chunk_range"
    BAD_PAYLOAD = "bad_payload"
    INCOMPLETE = "incomplete"
    DIGEST_MISMATCH = "digest_mismatch"
    COUNT_MISMATCH = "count_mismatch"
    EXISTS = "exists"
    LIMIT = "limit"
    STORAGE = "storage"
    TIMEOUT = "timeout"
    CLOSED = "closed"
    ABORTED = "aborted"
    INTERNAL = "internal"


# What each code means; PROTOCOL.md repeats these and a test keeps them in step.
ERROR_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.TRUNCATED: "the stream ended inside a frame",
    ErrorCode.FRAME_TOO_LARGE: "a length prefix exceeds MAX_FRAME_BYTES (or is zero)",
    ErrorCode.MALFORMED: "a frame body is not exactly one msgpack map with string keys",
    ErrorCode.UNKNOWN_KIND: "the kind field names no frame kind of the negotiated version",
    ErrorCode.BAD_FIELD: "a field is missing, has the wrong msgpack type, or is out of range",
    ErrorCode.VERSION: "the peers share no protocol version",
    ErrorCode.UNEXPECTED: "a valid frame arrived in a state that does not allow it",
    ErrorCode.UNKNOWN_BITMAP: "an id names no bitmap that is open on this connection",
    ErrorCode.DUPLICATE_ID: "a start frame reuses an id already used on this connection",
    ErrorCode.CHUNK_RANGE: "chunks (first/count, spans runs) lie outside the bitmap or exceed "
                           "MAX_FRAME_PAYLOAD",
    ErrorCode.BAD_PAYLOAD: "a payload does not decode to exactly the declared chunks",
    ErrorCode.INCOMPLETE: "complete arrived before every chunk was received at least once",
    ErrorCode.DIGEST_MISMATCH: "the rebuilt bitmap's digest differs from the complete frame's",
    ErrorCode.COUNT_MISMATCH: "the rebuilt bitmap's set-bit count differs from the frame's",
    ErrorCode.EXISTS: "the destination already holds a bitmap with this node and name",
    ErrorCode.LIMIT: "a limit (bitmaps per connection, memory budget) would be exceeded",
    ErrorCode.STORAGE: "the destination could not store the bitmap durably",
    ErrorCode.TIMEOUT: "a wait for the peer expired",
    ErrorCode.CLOSED: "the peer closed the connection before end of stream",
    ErrorCode.ABORTED: "the source gave up this bitmap; the destination discards it",
    ErrorCode.INTERNAL: "an unexpected failure inside the sender of this error",
}

# Codes that concern one bitmap only (sent with an id); all others end the connection.
BITMAP_ERRORS = frozenset(
    {
        ErrorCode.INCOMPLETE,
        ErrorCode.DIGEST_MISMATCH,
        ErrorCode.COUNT_MISMATCH,
        ErrorCode.EXISTS,
        ErrorCode.LIMIT,
        ErrorCode.STORAGE,
        ErrorCode.ABORTED,
        ErrorCode.BAD_PAYLOAD,
    }
)


def is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def name_problem(value: object, what: str = "name") -> str | None:
    """Why `value` cannot be a node or bitmap name, or None when it can. The one rule for
    every entry point (wire, control socket, command line, store): 1..MAX_NAME_BYTES bytes
    of UTF-8 and no NUL character (QEMU keeps names as C strings, so it cannot carry one)."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} is not valid UTF-8 text"
    if not 1 <= n <= MAX_NAME_BYTES:
        return f"{what} is {n} bytes long (UTF-8), allowed 1..{MAX_NAME_BYTES}"
    if "\0" in value:
        return f"{what} contains a NUL character, which names may not hold"
    return None


def _no_nul(v: str) -> bool:
    return "\0" not in v


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a frame: msgpack type, bounds, and whether it may be absent."""

    name: str
    type: type  # int (uint), str, bool, bytes (bin), list (array of str)
    lo: int = 0  # int: minimum value; str/bytes/list: minimum length (bytes / items)
    hi: int = MAX_U64  # int: maximum value; str/bytes/list: maximum length
    required: bool = True
    check: Callable[[Any], bool] | None = None
    check_text: str = ""


_ID = Field("id", int, 0, MAX_ID)
_CHUNK = Field("first", int, 0, MAX_U64)
_COUNT = Field("count", int, 1, MAX_U64)

FIELDS: dict[Kind, tuple[Field, ...]] = {
    Kind.HELLO: (
        Field("version", int, 1, 0xFFFF),
        Field("min_version", int, 1, 0xFFFF),
        Field("role", str, 1, 16),
        Field("caps", list, 0, MAX_CAPS),
        Field("agent", str, 0, 256, required=False),
    ),
    Kind.START: (
        _ID,
        Field("node", str, 1, MAX_NAME_BYTES, check=_no_nul,
              check_text="free of NUL characters"),
        Field("name", str, 1, MAX_NAME_BYTES, check=_no_nul,
              check_text="free of NUL characters"),
        Field("disk_size", int, 1, MAX_U64),
        Field("granularity", int, MIN_GRANULARITY, MAX_GRANULARITY, check=is_power_of_two,
              check_text="a power of two"),
        Field("chunk_size", int, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, check=is_power_of_two,
              check_text="a power of two"),
        Field("enabled", bool),
        Field("persistent", bool),
        Field("live", bool),
        Field("token", bytes, TOKEN_BYTES, TOKEN_BYTES, required=False),
    ),
    Kind.READY: (
        _ID,
        Field("have", bytes, 0, MAX_FRAME_PAYLOAD, required=False),
        Field("have_enc", int, 0, 0xFF, required=False, check=lambda v: v in VALID_ENCODINGS,
              check_text="a known encoding"),
    ),
    Kind.BITS: (
        _ID,
        _CHUNK,
        _COUNT,
        Field("enc", int, 0, 0xFF, check=lambda v: v in VALID_ENCODINGS,
              check_text="a known encoding"),
        Field("data", bytes, 0, MAX_FRAME_PAYLOAD),
    ),
    Kind.ZEROES: (_ID, _CHUNK, _COUNT),
    Kind.COMPLETE: (
        _ID,
        Field("digest", bytes, DIGEST_BYTES, DIGEST_BYTES),
        Field("count", int, 0, MAX_U64),
    ),
    Kind.ACK: (_ID, Field("digest", bytes, DIGEST_BYTES, DIGEST_BYTES)),
    Kind.ERROR: (
        Field("code", str, 1, 64),
        Field("message", str, 0, MAX_MESSAGE_BYTES),
        Field("id", int, 0, MAX_ID, required=False),
    ),
    Kind.END: (),
    Kind.MARK: (Field("seq", int, 0, MAX_U64),),
    Kind.SPANS: (
        _ID,
        Field("runs", bytes, 2, MAX_RUNS_BYTES),  # structure checked by protocol.runs
        Field("enc", int, 0, 0xFF, check=lambda v: v in VALID_ENCODINGS,
              check_text="a known encoding"),
        Field("data", bytes, 0, MAX_FRAME_PAYLOAD),
    ),
}

KIND_FIELD = "kind"



class Role(StrEnum):
    """The two ends of a migration. The values are the `role` strings of hello; traces,
    metrics and the control socket print them as they are."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


# The peer that announces this capability accepts spans frames (kind 11): many runs of
# chunks of one bitmap in one frame. A sender uses them only with a peer that announced it.
CAP_SPANS = "spans-v1"

# Capabilities this implementation announces. Unknown capabilities are ignored.
CAPABILITIES: tuple[str, ...] = ("encodings-v1", "tree-blake3", CAP_SPANS)
