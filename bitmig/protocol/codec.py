"""Frame bodies <-> events: msgpack maps checked field by field against spec.FIELDS."""

from __future__ import annotations

import mmap
from typing import Any

import msgpack

from bitmig.protocol import spec
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import EVENT_TYPES, Bits, Event, Spans
from bitmig.protocol.runs import decode_runs
from bitmig.protocol.spec import ErrorCode, Field, Kind

_PREFIX = spec.LENGTH_PREFIX
_TYPE_NAMES = {int: "unsigned integer", str: "string", bool: "boolean", bytes: "binary",
               list: "array of strings"}


def _bin_header(n: int) -> bytes:
    """msgpack's shortest bin header for n bytes (what msgpack.packb writes)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def event_to_map(event: Event) -> dict[str, Any]:
    """The msgpack map of an event: kind first, then fields in spec order, absent omitted."""
    kind = event.KIND
    out: dict[str, Any] = {spec.KIND_FIELD: int(kind)}
    for f in spec.FIELDS[kind]:
        v = getattr(event, f.name)
        if v is None and not f.required:
            continue
        out[f.name] = list(v) if f.type is list else v
    return out


_BITS_HEAD_KEYS = [msgpack.packb(k) for k in (spec.KIND_FIELD, "id", "first", "count", "enc")]
_SPANS_HEAD_KEYS = [msgpack.packb(k) for k in (spec.KIND_FIELD, "id", "runs", "enc")]
_DATA_KEY = msgpack.packb("data")


def _spans_head(event: Spans, nbytes: int) -> bytes:
    runs = bytes(event.runs)
    return b"".join((
        b"\x85",  # fixmap of 5 entries
        _SPANS_HEAD_KEYS[0], msgpack.packb(int(Kind.SPANS)),
        _SPANS_HEAD_KEYS[1], msgpack.packb(event.id),
        _SPANS_HEAD_KEYS[2], _bin_header(len(runs)), runs,
        _SPANS_HEAD_KEYS[3], msgpack.packb(event.enc),
        _DATA_KEY, _bin_header(nbytes),
    ))


def encode(event: Event) -> list[bytes | memoryview]:
    """Bytes of one frame (length prefix + msgpack body), as buffers to write in order.

    A bits frame is returned as header + payload so the payload (a view into the bitmap)
    is never copied; the bytes equal msgpack.packb of the whole map.
    """
    if type(event) is Bits:
        data = memoryview(event.data).cast("B")
        head = b"".join(
            (
                b"\x86",  # fixmap of 6 entries
                _BITS_HEAD_KEYS[0], msgpack.packb(int(Kind.BITS)),
                _BITS_HEAD_KEYS[1], msgpack.packb(event.id),
                _BITS_HEAD_KEYS[2], msgpack.packb(event.first),
                _BITS_HEAD_KEYS[3], msgpack.packb(event.count),
                _BITS_HEAD_KEYS[4], msgpack.packb(event.enc),
                _DATA_KEY, _bin_header(data.nbytes),
            )
        )
        return [_PREFIX.pack(len(head) + data.nbytes) + head, data]
    if type(event) is Spans:
        data = memoryview(event.data).cast("B")
        head = _spans_head(event, data.nbytes)
        return [_PREFIX.pack(len(head) + data.nbytes) + head, data]
    body = msgpack.packb(event_to_map(event), use_bin_type=True)
    return [_PREFIX.pack(len(body)) + body]


def encode_bytes(event: Event) -> bytes:
    return b"".join(bytes(b) for b in encode(event))


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FIELD, message)


def _check_field(kind: Kind, f: Field, v: Any) -> Any:
    where = f"{kind.name.lower()}.{f.name}"
    if type(v) is not f.type:
        raise _bad(f"{where} must be a {_TYPE_NAMES[f.type]}, got {type(v).__name__}")
    if f.type is int:
        if not f.lo <= v <= f.hi:
            raise _bad(f"{where} = {v} is outside [{f.lo}, {f.hi}]")
        if f.check is not None and not f.check(v):
            raise _bad(f"{where} = {v} is not {f.check_text}")
        return v
    if f.type is bool:
        return v
    if f.type is list:
        if not f.lo <= len(v) <= f.hi:
            raise _bad(f"{where} has {len(v)} items, allowed [{f.lo}, {f.hi}]")
        for item in v:
            if type(item) is not str or not 1 <= len(item.encode()) <= spec.MAX_CAP_BYTES:
                raise _bad(f"{where} items must be strings of 1..{spec.MAX_CAP_BYTES} bytes")
        return tuple(v)
    n = len(v.encode()) if f.type is str else len(v)
    if not f.lo <= n <= f.hi:
        unit = "bytes"
        raise _bad(f"{where} is {n} {unit} long, allowed [{f.lo}, {f.hi}]")
    if f.check is not None and not f.check(v):
        raise _bad(f"{where} is not {f.check_text}")
    return v


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """A map whose keys are strings, each once (msgpack alone would let the last win)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if type(k) is not str:
            raise ValueError(f"map key of type {type(k).__name__}; keys must be strings")
        if k in out:
            raise ValueError(f"map key {k!r} repeated")
        out[k] = v
    return out


def decode_body(body: bytes | memoryview) -> Event:
    """Decode and validate one frame body. Raises RemoteProtocolError with a clear code."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True,
                              object_pairs_hook=_strict_map)
    except msgpack.ExtraData as e:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"{len(e.extra)} bytes after the msgpack object in the frame"
        ) from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"frame body is not msgpack: {e}") from None
    if type(obj) is not dict:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"frame body must be a msgpack map, got {type(obj).__name__}"
        )
    return _event_of(obj)


def _event_of(obj: dict[str, Any], payload: Any = None) -> Event:
    """The event of a decoded frame map, every field checked. `payload`: the data field of
    a bits frame whose payload is not in `obj` (decode_bits_head): its length is checked
    here, its bytes are not needed."""
    if spec.KIND_FIELD not in obj:
        raise _bad("frame has no kind field")
    raw_kind = obj[spec.KIND_FIELD]
    if type(raw_kind) is not int:
        raise _bad(f"kind must be an unsigned integer, got {type(raw_kind).__name__}")
    try:
        kind = Kind(raw_kind)
    except ValueError:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_KIND,
                                  f"unknown frame kind {raw_kind}") from None
    values: dict[str, Any] = {}
    for f in spec.FIELDS[kind]:
        if payload is not None and f.name == "data":
            n = memoryview(payload).nbytes
            if not f.lo <= n <= f.hi:
                raise _bad(f"{kind.name.lower()}.data is {n} bytes long, allowed "
                           f"[{f.lo}, {f.hi}]")
            values["data"] = payload
            continue
        if f.name not in obj:
            if f.required:
                raise _bad(f"{kind.name.lower()} frame lacks the field {f.name!r}")
            continue
        values[f.name] = _check_field(kind, f, obj[f.name])
    if kind is Kind.SPANS:
        decode_runs(values["runs"])  # its structure is part of the field's check
    # Unknown fields are ignored: that is how later versions extend a frame.
    return EVENT_TYPES[kind](**values)


_VOID: list[memoryview] = []


def _void(n: int) -> memoryview:
    """n read-only zero bytes that cost no memory (an untouched anonymous mapping)."""
    if not _VOID:
        _VOID.append(memoryview(mmap.mmap(-1, spec.MAX_FRAME_BYTES, prot=mmap.PROT_READ)))
    return _VOID[0][:n]


HEAD_BYTES = 128  # a bits frame's fields before its payload fit in this (~40 bytes as sent)
_BIN_SIZES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def decode_bits_head(head: bytes | memoryview, body_len: int) -> tuple[Bits, int] | None:
    """A bits frame decoded from the first bytes of its body, before its payload arrived.

    `head` holds the first min(body_len, HEAD_BYTES) bytes (or more) of a body of
    `body_len` bytes. When the body is a map whose last entry is `data`, a bin running
    exactly to the end of the body, returns the event, checked like decode_body does,
    and the payload's offset in the body. The event's data is a read-only placeholder of
    the payload's length (no memory behind it): the caller decides where the payload goes
    once the event passed the connection's checks, and puts the real bytes in. Anything
    else (another kind, another layout, a bad field) returns None: decode_body then
    decodes the whole frame and reports its error.
    """
    mv = memoryview(head).cast("B")
    up = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True,
                          max_buffer_size=max(len(mv), 1))
    up.feed(mv[:HEAD_BYTES])
    try:
        n = up.read_map_header()
        pairs: list[tuple[Any, Any]] = []
        for i in range(n):
            key = up.unpack()
            if key == "data" and i == n - 1:
                pos = up.tell()
                width = _BIN_SIZES.get(mv[pos]) if pos < len(mv) else None
                if width is None or pos + 1 + width > len(mv):
                    return None
                size = int.from_bytes(mv[pos + 1 : pos + 1 + width], "big")
                start = pos + 1 + width
                if start + size != body_len or size > spec.MAX_FRAME_BYTES:
                    return None
                event = _event_of(_strict_map(pairs), _void(size))
                return (event, start) if type(event) is Bits else None
            pairs.append((key, up.unpack()))
    except (ValueError, TypeError, msgpack.UnpackException, RemoteProtocolError):
        return None  # OutOfData too (a longer head): the whole-frame path decides
    return None
