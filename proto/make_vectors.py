#!/usr/bin/env python3
"""Generate the conformance vectors in proto/vectors/ from the reference code.

Run from the repository root:  python proto/make_vectors.py  [--out DIR]  (writes vectors)
                               python proto/make_vectors.py --example  (prints the worked
                               example of PROTOCOL.md as markdown)

Every byte comes from bitmig's own encoder (bitmig.protocol.codec, bitmig.protocol.encodings)
or from msgpack.packb of a deliberately broken map; nothing is typed in by hand. Each vector
is checked against a fresh Connection (on the destination, with the real destination session,
bitmig.session.memory.MemoryDestination) before it is written, so the output always
describes what the code does.

Vector format (one JSON object per file):
  name, description   what the case shows
  role                the side that receives `hex`: "source" or "destination"
  context             frames exchanged before `hex` to reach the state, in order, each
                      {"sender": role, "hex": frame bytes, "frame": decoded frame}
  hex                 the bytes under test (zero or more frames, possibly cut short)
  eof                 true when the peer closes the stream right after `hex`
  frames              decoded meaning of `hex`, frame by frame (bin fields as hex); for an
                      error vector, the frames up to and including the offending one where
                      that one is still a msgpack map
  canonical           false when `hex` is not the canonical encoding of `frames` (then
                      canonical_hex holds the bytes the encoder produces for them)
  detected_by         "connection" (framing, fields, state), "assembly" (the destination's
                      rebuild: payload decoding and verification) or "eof"
  error               null, or {"code": ErrorCode value, "message_contains": text}
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.core.planner import Planner
from bitmig.protocol import encodings, spec
from bitmig.protocol.codec import encode_bytes, event_to_map
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError, RemoteProtocolError
from bitmig.protocol.events import (
    EVENT_TYPES,
    Ack,
    BitmapFailed,
    Bits,
    Complete,
    End,
    Error,
    Event,
    Hello,
    Mark,
    Ready,
    Spans,
    Start,
    Zeroes,
)
from bitmig.protocol.framing import pieces
from bitmig.protocol.runs import encode_runs
from bitmig.protocol.spec import Encoding, ErrorCode, Kind
from bitmig.protocol.state import Role
from bitmig.session.memory import MemoryDestination

OUT = Path(__file__).resolve().parent / "vectors"
S, D = "source", "destination"
AGENT = "example/1"

# The geometry of most examples: 7990 clusters of 64 KiB -> 125 words = 1000 bytes,
# 256-byte chunks -> 4 chunks, the last one 232 bytes long with 10 padding bits.
GRAN = 64 * spec.KiB
DISK = 7990 * GRAN
CHUNK = 256
NCHUNKS = 4


# -- JSON forms ---------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(_jsonable(k)): _jsonable(x) for k, x in v.items()}
    return v


def map_json(m: dict[Any, Any]) -> dict[str, Any]:
    """A frame's msgpack map as JSON: kind by name when known, bin as hex."""
    out = _jsonable(m)
    k = m.get("kind")
    if type(k) is int and k in Kind._value2member_map_:
        out["kind"] = Kind(k).name.lower()
    return out


def event_json(ev: Event) -> dict[str, Any]:
    return map_json(event_to_map(ev))


def frame(m: dict[str, Any]) -> bytes:
    """Length prefix + msgpack body of an arbitrary map (for broken frames)."""
    body = msgpack.packb(m, use_bin_type=True)
    return spec.LENGTH_PREFIX.pack(len(body)) + body


def body_frame(body: bytes) -> bytes:
    return spec.LENGTH_PREFIX.pack(len(body)) + body


# -- standard frames ----------------------------------------------------------------------


def hello_s(**kw: Any) -> Hello:
    args = dict(version=spec.PROTOCOL_VERSION, min_version=spec.MIN_PROTOCOL_VERSION,
                role=S, caps=spec.CAPABILITIES, agent=AGENT)
    args.update(kw)
    return Hello(**args)


def hello_d(**kw: Any) -> Hello:
    return hello_s(role=D, **kw)


def start(bid: int = 0, live: bool = True, **kw: Any) -> Start:
    args = dict(id=bid, node="drive0", name="bitmap0", disk_size=DISK, granularity=GRAN,
                chunk_size=CHUNK, enabled=True, persistent=True, live=live)
    args.update(kw)
    return Start(**args)


def ctx(*pairs: tuple[str, Event]) -> list[dict[str, Any]]:
    return [{"sender": who, "hex": encode_bytes(ev).hex(), "frame": event_json(ev)}
            for who, ev in pairs]


OPEN = ((S, hello_s()), (D, hello_d()))


def streaming(st: Start | None = None) -> tuple[tuple[str, Event], ...]:
    st = st or start()
    return (*OPEN, (S, st), (D, Ready(st.id)))


def words_with(bits: list[int] | np.ndarray, nbits: int) -> np.ndarray:
    w = np.zeros(-(-nbits // 64), dtype="<u8")
    for b in np.asarray(bits, dtype=np.int64).tolist():
        w[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
    return w


# -- the vectors -----------------------------------------------------------------------------

VECTORS: list[dict[str, Any]] = []


def add(name: str, description: str, role: str, data: bytes, frames: list[Any],
        context: tuple[tuple[str, Event], ...] = (), error: tuple[str, str] | None = None,
        eof: bool = False, detected_by: str = "connection", canonical_hex: bytes | None = None,
        ) -> None:
    v: dict[str, Any] = {
        "name": name,
        "description": description,
        "role": role,
        "context": ctx(*context),
        "hex": data.hex(),
        "eof": eof,
        "frames": [f if isinstance(f, dict) else event_json(f) for f in frames],
        "canonical": canonical_hex is None,
        "detected_by": detected_by if error else None,
        "error": None if error is None else {"code": str(error[0]),
                                             "message_contains": error[1]},
    }
    if canonical_hex is not None:
        v["canonical_hex"] = canonical_hex.hex()
    VECTORS.append(v)


def valid(name: str, description: str, role: str, events: list[Event],
          context: tuple[tuple[str, Event], ...] = ()) -> None:
    add(name, description, role, b"".join(encode_bytes(e) for e in events), events, context)


def error_frame_doc(name: str, description: str, role: str, ev: Error,
                    context: tuple[tuple[str, Event], ...]) -> None:
    valid(name, description, role, [ev], context)


def build() -> None:
    # ---- hello and version negotiation
    valid("hello_source", "The source's hello: versions 1..1, both capabilities, an agent.",
          D, [hello_s()])
    valid("hello_source_minimal", "A hello with no capabilities and no agent (optional).",
          D, [hello_s(caps=(), agent=None)])
    valid("hello_destination", "The destination's answer names the chosen version.",
          S, [hello_d()], ((S, hello_s()),))
    valid("hello_newer_source", "A source speaking versions 1..7 meets a version-1 "
          "destination: the common version 1 is chosen; hello is not an error.",
          D, [hello_s(version=7, min_version=1)])
    ext = {"kind": 1, "version": 1, "min_version": 1, "role": S, "caps": ["encodings-v1"],
           "x-future": {"a": 1}, "x-flag": True}
    add("hello_unknown_fields_ignored", "Fields a receiver does not know are ignored: this is "
        "how later versions extend frames. Re-encoding drops them (canonical_hex).",
        D, frame(ext), [Hello(1, 1, S, ("encodings-v1",))],
        canonical_hex=encode_bytes(Hello(1, 1, S, ("encodings-v1",))))
    # ---- start / ready
    valid("start_live", "start of a live bitmap: 7990 clusters of 64 KiB, 1000 serialized "
          "bytes, 256-byte chunks (4 chunks, the last 232 bytes).", D, [start()], OPEN)
    valid("start_small", "start of a small bitmap (live=false): no bulk or dirty passes.",
          D, [start(live=False, enabled=False, persistent=False)], OPEN)
    valid("start_extremes", "Largest names (1023 UTF-8 bytes), a non-ASCII name, id 2^32-1, "
          "chunk size 8 and granularity 2^31.",
          D, [start(spec.MAX_ID, node="n" * spec.MAX_NAME_BYTES, name="b\u00e9" * 340 + "xyz",
                    disk_size=1 << 40, granularity=spec.MAX_GRANULARITY,
                    chunk_size=spec.MIN_CHUNK_SIZE)], OPEN)
    valid("ready", "The destination accepts a started bitmap.", S, [Ready(0)],
          (*OPEN, (S, start())))
    tok = bytes(range(16))
    valid("start_with_token", "start carrying a resume token (16 bytes, the same on every "
          "retry of this bitmap's migration).", D, [start(token=tok)], OPEN)
    have_mask = np.array([0b1011], dtype="<u8")  # chunks 0, 1 and 3 of 4 are held
    henc, hdata = encodings.encode(have_mask)
    valid("ready_resume_have", "ready answering a retry: the destination holds chunks 0, 1 "
          "and 3 (mask 0b1011 in one 64-bit word, here sent as POSITIONS).", S,
          [Ready(0, bytes(hdata), int(henc))], (*OPEN, (S, start(token=tok))))

    # ---- bits in every encoding (chunk geometry of start())
    rng = np.random.default_rng(1)
    nb = CHUNK * 8
    dense = rng.integers(0, 1 << 63, size=CHUNK // 8, dtype=np.uint64).astype("<u8")
    sparse = words_with([3, 64, 200, 2047], nb)
    runs_w = words_with(list(range(100, 400)) + list(range(1000, 1010)), nb)
    many_pos = words_with(list(range(5, nb, 20)), nb)
    many_clear = ~words_with(list(range(7, nb, 20)), nb)
    cases = [
        ("bits_raw", dense, Encoding.RAW, "RAW: the 256 serialized bytes verbatim."),
        ("bits_positions", sparse, Encoding.POSITIONS,
         "POSITIONS: bits 3, 64, 200, 2047 set -> gaps 3, 60, 135, 1846 as LEB128."),
        ("bits_runs", runs_w, Encoding.RUNS,
         "RUNS: clear 100, set 300, clear 600, set 10, clear 1038 as LEB128."),
        ("bits_positions_zlib", many_pos, Encoding.POSITIONS | Encoding.ZLIB,
         "POSITIONS|ZLIB: 103 bits 20 apart; the gap list deflated (RFC 1950)."),
        ("bits_runs_zlib", many_clear, Encoding.RUNS | Encoding.ZLIB,
         "RUNS|ZLIB: every 20th bit clear, the rest set; run list deflated."),
    ]
    for name, words, want, desc in cases:
        enc, data = encodings.encode(words)
        assert enc == want, (name, enc)
        valid(name, desc + " Chunk 1 of bitmap 0.", D, [Bits(0, 1, 1, int(enc), bytes(data))],
              streaming())
    raw_z = zlib.compress(sparse.tobytes(), 9)
    valid("bits_raw_zlib", "RAW|ZLIB: the raw bytes of chunk 1 deflated (valid, though the "
          "reference encoder prefers POSITIONS here).", D,
          [Bits(0, 1, 1, int(Encoding.RAW | Encoding.ZLIB), raw_z)], streaming())
    last = words_with([0, 1845], 232 * 8)
    valid("bits_last_chunk_short", "The last chunk is short: chunk 3 holds 232 bytes (bits "
          "6144..7989 plus 10 zero padding bits), so its RAW payload is 232 bytes.", D,
          [Bits(0, 3, 1, int(Encoding.RAW), last.tobytes())], streaming())
    two = np.concatenate([sparse, last])
    enc2, data2 = encodings.encode(two)
    valid("bits_two_chunks", "One frame may cover several chunks: chunks 2..3 (488 bytes) as "
          "POSITIONS.", D, [Bits(0, 2, 2, int(enc2), bytes(data2))], streaming())
    valid("bits_positions_empty", "POSITIONS with an empty payload: no bit set.", D,
          [Bits(0, 0, 1, int(Encoding.POSITIONS), b"")], streaming())
    valid("zeroes", "zeroes: chunks 0..3 are all clear (no payload).", D,
          [Zeroes(0, 0, NCHUNKS)], streaming())

    # ---- spans: many runs in one frame (capability spans-v1)
    sp = np.concatenate([sparse, last])  # chunk 0 (sparse) and chunk 3 (short, 232 bytes)
    enc_sp, data_sp = encodings.encode(sp)
    valid("spans_two_runs", "spans: chunks 0 and 3 in one frame. runs = (skip 0, count 1), "
          "(skip 2, count 1) = 00 01 02 01; the payload is the 256 + 232 serialized bytes of "
          "the two runs, concatenated, then encoded as one (here POSITIONS).", D,
          [Spans(0, encode_runs(np.array([0, 3]), np.array([1, 1])), int(enc_sp),
                 bytes(data_sp))], streaming())
    valid("spans_raw_three_runs", "spans with a RAW payload: chunk 0, chunks 2..3 (two runs "
          "apart would do too; runs may also touch). 256 + 256 + 232 = 744 bytes verbatim.",
          D, [Spans(0, encode_runs(np.array([0, 2, 3]), np.array([1, 1, 1])),
                    int(Encoding.RAW), np.concatenate([dense, sparse, last]).tobytes())],
          streaming())


    # ---- complete / ack / error / end
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    bm.set_many(np.array([64 + 2048, 7989]))
    pre = (*streaming(), (S, Zeroes(0, 0, 1)),
           (S, Bits(0, 1, 3, int(encodings.encode(bm.chunk_words_view(1, 3))[0]),
                    bytes(encodings.encode(bm.chunk_words_view(1, 3))[1]))))
    dig = tree_digest(bm.words.data)
    valid("complete", "complete after every chunk arrived: the destination's rebuild has "
          "count 2 and this tree digest.", D, [Complete(0, dig, 2)], pre)
    valid("ack", "The destination verified and stored the bitmap: the ack is the handoff.",
          S, [Ack(0, dig)], (*pre, (S, Complete(0, dig, 2))))
    done = (*pre, (S, Complete(0, dig, 2)), (D, Ack(0, dig)))
    valid("mark_source", "The source's sync point.", D, [Mark(41)], OPEN)
    valid("mark_echo", "The destination echoes the mark once it has applied everything "
          "before it.", S, [Mark(41)], (*OPEN, (S, Mark(41))))
    valid("end_source", "The source ends the session once no bitmap is open.", D, [End()], done)
    valid("end_destination", "The destination's end closes the session.", S, [End()],
          (*done, (S, End())))
    valid("error_fatal", "A fatal error frame (no id) ends the connection.", D,
          [Error("internal", "worker crashed")], OPEN)

    # ---- codes that only a peer's error frame can carry (no byte pattern causes them)
    error_frame_doc("error_exists", "Per-bitmap: the destination already holds drive0/bitmap0 "
                    "and refuses the start.", S,
                    Error("exists", "bitmap drive0/bitmap0 already exists on the destination", 0),
                    (*OPEN, (S, start())))
    error_frame_doc("error_limit_budget", "Per-bitmap: the bitmap does not fit the "
                    "destination's memory budget.", S,
                    Error("limit", "bitmap of 1000 bytes exceeds the destination's free memory "
                          "budget", 0), (*OPEN, (S, start())))
    error_frame_doc("error_storage", "Per-bitmap: verified, but the destination could not "
                    "store it durably; the source keeps ownership.", S,
                    Error("storage", "cannot store drive0/bitmap0: No space left on device", 0),
                    (*pre, (S, Complete(0, dig, 2))))
    error_frame_doc("error_aborted", "Per-bitmap: the source gives the bitmap up; the "
                    "destination discards what it rebuilt.", D,
                    Error("aborted", "bitmap removed on the source", 0), streaming())
    error_frame_doc("error_timeout", "Fatal: a wait for the peer expired.", S,
                    Error("timeout", "timed out after 30s waiting for the next frame"),
                    streaming())
    error_frame_doc("error_internal", "Fatal: an unexpected failure in the sender.", D,
                    Error("internal", "unexpected failure"), OPEN)
    error_frame_doc("error_peer_reported_payload", "Per-bitmap: the destination reports a "
                    "payload it could not decode.", S,
                    Error("bad_payload", "payload ends inside a varint", 0), streaming())

    # ---- framing errors
    h = encode_bytes(hello_s())
    add("truncated_body", "The stream ends inside a frame body.", D, h[:-3], [], eof=True,
        error=(ErrorCode.TRUNCATED, "stream ended inside a frame"), detected_by="eof")
    add("truncated_prefix", "The stream ends inside a length prefix.", D, h[:2], [], eof=True,
        error=(ErrorCode.TRUNCATED, "2 bytes buffered"), detected_by="eof")
    add("frame_too_large", "A length prefix of MAX_FRAME_BYTES + 1 is refused before any "
        "body byte arrives.", D, spec.LENGTH_PREFIX.pack(spec.MAX_FRAME_BYTES + 1), [],
        error=(ErrorCode.FRAME_TOO_LARGE, f"frame length {spec.MAX_FRAME_BYTES + 1}"))
    add("frame_zero_length", "A zero length prefix is refused.", D, b"\0\0\0\0", [],
        error=(ErrorCode.FRAME_TOO_LARGE, "frame length 0"))
    add("malformed_not_msgpack", "The body is not msgpack (0xc1 is never used).", D,
        body_frame(b"\xc1"), [], error=(ErrorCode.MALFORMED, "not msgpack"))
    add("malformed_incomplete_body", "The body ends inside the msgpack object.", D,
        body_frame(msgpack.packb({"kind": 1})[:-1]), [],
        error=(ErrorCode.MALFORMED, "not msgpack"))
    add("malformed_not_a_map", "The body is a msgpack array, not a map.", D,
        frame([1, 1, 1]), [], error=(ErrorCode.MALFORMED, "must be a msgpack map"))
    add("malformed_trailing_bytes", "Two msgpack objects in one frame.", D,
        body_frame(msgpack.packb({"kind": 9}) + b"\xc0"), [],
        error=(ErrorCode.MALFORMED, "1 bytes after the msgpack object"))
    add("malformed_integer_key", "Map keys must be strings.", D, frame({1: 1}), [],
        error=(ErrorCode.MALFORMED, "keys must be strings"))
    add("malformed_bin_key", "A map key of msgpack type bin is not a string key.", D,
        body_frame(b"\x81\xc4\x04kind\x01"), [],
        error=(ErrorCode.MALFORMED, "keys must be strings"))
    add("malformed_repeated_key", "A map key may appear once.", D,
        body_frame(b"\x82\xa4kind\x09\xa4kind\x09"), [],
        error=(ErrorCode.MALFORMED, "repeated"))
    add("malformed_bad_utf8", "A str that is not UTF-8.", D,
        body_frame(b"\x82\xa4kind\x01\xa4role\xa2\xff\xfe"), [],
        error=(ErrorCode.MALFORMED, "not msgpack"))
    add("unknown_kind", "kind 99 is no frame kind of version 1: unknown kinds are errors.",
        D, frame({"kind": 99}), [{"kind": 99}],
        error=(ErrorCode.UNKNOWN_KIND, "unknown frame kind 99"))
    add("unknown_kind_zero", "kind 0 is not a frame kind.", D, frame({"kind": 0}),
        [{"kind": 0}], error=(ErrorCode.UNKNOWN_KIND, "unknown frame kind 0"))

    # ---- field errors
    hm = event_to_map(hello_s())

    def hello_with(**kw: Any) -> dict[str, Any]:
        m = dict(hm)
        for k, v in kw.items():
            if v is None:
                m.pop(k)
            else:
                m[k] = v
        return m

    def bad(name: str, desc: str, m: dict[str, Any], msg: str, role: str = D,
            context: tuple[tuple[str, Event], ...] = ()) -> None:
        add(name, desc, role, frame(m), [map_json(m)], context,
            error=(ErrorCode.BAD_FIELD, msg))

    bad("bad_field_no_kind", "A map without the kind field.", {"version": 1},
        "frame has no kind field")
    bad("bad_field_kind_type", "kind must be an unsigned integer.", {"kind": "hello"},
        "kind must be an unsigned integer")
    bad("bad_field_missing", "hello without its required role field.", hello_with(role=None),
        "hello frame lacks the field 'role'")
    bad("bad_field_wrong_type", "hello.version as a string.", hello_with(version="1"),
        "hello.version must be a unsigned integer, got str")
    bad("bad_field_version_zero", "hello.version 0 is below its range 1..65535.",
        hello_with(version=0), "hello.version = 0 is outside [1, 65535]")
    bad("bad_field_caps_item", "hello.caps items must be strings of 1..64 bytes.",
        hello_with(caps=["x" * 65]), "hello.caps items must be strings of 1..64 bytes")
    bad("bad_field_too_many_caps", "hello.caps holds at most 32 items.",
        hello_with(caps=[f"c{i}" for i in range(33)]), "hello.caps has 33 items")
    bad("bad_field_role", "A source's hello that claims the destination role.",
        hello_with(role=D), "hello.role is 'destination', expected 'source'")
    bad("bad_field_min_version", "hello.min_version above hello.version.",
        hello_with(version=2, min_version=3), "hello.min_version exceeds hello.version")
    sm = event_to_map(start())
    bad("bad_field_bool_as_int", "start.live must be a msgpack boolean, not 1.",
        {**sm, "live": 1}, "start.live must be a boolean, got int", context=OPEN)
    bad("bad_field_granularity_range", "start.granularity 256 is below 512.",
        {**sm, "granularity": 256}, "start.granularity = 256 is outside [512, 2147483648]",
        context=OPEN)
    bad("bad_field_not_power_of_two", "start.chunk_size 1000 is not a power of two.",
        {**sm, "chunk_size": 1000}, "start.chunk_size = 1000 is not a power of two",
        context=OPEN)
    bad("bad_field_negative_id", "Integers are unsigned: id -1 is out of range.",
        {**sm, "id": -1}, "start.id = -1 is outside [0, 4294967295]", context=OPEN)
    bad("bad_field_id_too_large", "id 2^32 exceeds MAX_ID.",
        {**sm, "id": 1 << 32}, "start.id = 4294967296 is outside [0, 4294967295]",
        context=OPEN)
    bad("bad_field_name_too_long", "start.name of 1024 UTF-8 bytes.",
        {**sm, "name": "\u00e9" * 512}, "start.name is 1024 bytes long, allowed [1, 1023]",
        context=OPEN)
    bad("bad_field_empty_node", "start.node must not be empty.",
        {**sm, "node": ""}, "start.node is 0 bytes long, allowed [1, 1023]", context=OPEN)
    bad("bad_field_disk_size_zero", "start.disk_size 0.", {**sm, "disk_size": 0},
        "start.disk_size = 0 is outside", context=OPEN)
    bm_ = event_to_map(Bits(0, 1, 1, 0, bytes(CHUNK)))
    bad("bad_field_unknown_encoding", "bits.enc 3 is no encoding (valid: 0, 1, 2, 16, 17, 18).",
        {**bm_, "enc": 3}, "bits.enc = 3 is not a known encoding", context=streaming())
    bad("bad_field_data_as_str", "bits.data must be msgpack bin, not str.",
        {**bm_, "data": "abc"}, "bits.data must be a binary, got str", context=streaming())
    bad("bad_field_count_zero", "zeroes.count 0 (a frame covers at least one chunk).",
        event_to_map(Zeroes(0, 0, 1)) | {"count": 0}, "zeroes.count = 0 is outside",
        context=streaming())
    bad("bad_field_digest_length", "complete.digest must be exactly 32 bytes.",
        event_to_map(Complete(0, bytes(32), 0)) | {"digest": bytes(31)},
        "complete.digest is 31 bytes long, allowed [32, 32]", context=streaming())
    bad("bad_field_error_code_empty", "error.code must not be empty.",
        {"kind": 8, "code": "", "message": "x"}, "error.code is 0 bytes long", context=OPEN)

    # ---- version negotiation
    add("version_no_common", "A source speaking only versions 2..3 meets a version-1 "
        "destination.", D, encode_bytes(hello_s(version=3, min_version=2)),
        [hello_s(version=3, min_version=2)],
        error=(ErrorCode.VERSION, "peer speaks versions 2..3"))
    add("version_destination_chose_higher", "The destination's answer must name a version "
        "the source offered.", S, encode_bytes(hello_d(version=2)), [hello_d(version=2)],
        ((S, hello_s()),), error=(ErrorCode.VERSION, "destination chose version 2"))

    # ---- state errors
    def unexpected(name: str, desc: str, role: str, ev: Event,
                   context: tuple[tuple[str, Event], ...], msg: str,
                   code: ErrorCode = ErrorCode.UNEXPECTED) -> None:
        add(name, desc, role, encode_bytes(ev), [ev], context, error=(code, msg))

    unexpected("unexpected_start_before_hello", "start before hello.", D, start(), (),
               "source may not send start in state idle")
    unexpected("unexpected_second_hello", "hello twice.", D, hello_s(), OPEN,
               "source may not send hello in state open")
    unexpected("unexpected_hello_from_destination_first", "The destination may not speak "
               "first.", S, hello_d(), (), "destination may not send hello in state idle")
    unexpected("unexpected_bits_before_ready", "bits before the destination's ready.", D,
               Bits(0, 0, 1, int(Encoding.POSITIONS), b""), (*OPEN, (S, start())),
               "source may not send bits for bitmap 0 in state started")
    unexpected("unexpected_ready_twice", "ready for a bitmap already streaming.", S,
               Ready(0), streaming(), "destination may not send ready for bitmap 0 in state "
               "streaming")
    unexpected("unexpected_ready_from_source", "ready is the destination's frame.", D,
               Ready(0), (*OPEN, (S, start())), "source may not send ready in state open")
    unexpected("unexpected_complete_twice", "complete twice for one bitmap.", D,
               Complete(0, dig, 2), (*pre, (S, Complete(0, dig, 2))),
               "source may not send complete for bitmap 0 in state completing")
    unexpected("unexpected_bits_after_complete", "bits after complete.", D,
               Zeroes(0, 0, 1), (*pre, (S, Complete(0, dig, 2))),
               "source may not send zeroes for bitmap 0 in state completing")
    unexpected("unexpected_ack_before_complete", "ack before complete.", S, Ack(0, dig),
               streaming(), "destination may not send ack for bitmap 0 in state streaming")
    unexpected("unexpected_end_with_open_bitmap", "end while a bitmap is unfinished.", D,
               End(), streaming(), "end while bitmaps [0] are unfinished")
    unexpected("unexpected_end_from_destination_first", "Only the source may begin the end.",
               S, End(), done, "destination may not send end in state open")
    unexpected("unexpected_frame_after_end", "Nothing follows end but the peer's end.", D,
               start(1), (*done, (S, End())), "source may not send start in state ending")
    unexpected("unexpected_bitmap_error_before_open", "A per-bitmap error before the "
               "handshake finished.", D, Error("aborted", "x", 0), ((S, hello_s()),),
               "error for bitmap 0 in state greeted")
    unexpected("unknown_bitmap", "bits for an id that was never started.", D,
               Zeroes(7, 0, 1), streaming(), "zeroes names bitmap id 7, never started",
               ErrorCode.UNKNOWN_BITMAP)
    unexpected("unknown_bitmap_ready", "ready for an id that was never started.", S,
               Ready(3), (*OPEN, (S, start())), "ready names bitmap id 3, never started",
               ErrorCode.UNKNOWN_BITMAP)
    unexpected("unknown_bitmap_error_frame", "An error frame naming an unknown id.", D,
               Error("aborted", "x", 9), streaming(), "error names bitmap id 9",
               ErrorCode.UNKNOWN_BITMAP)
    unexpected("duplicate_id", "A second start with id 0 (ids are never reused on a "
               "connection, not even after ack).", D, start(0, name="other"), done,
               "bitmap id 0 was already started", ErrorCode.DUPLICATE_ID)
    unexpected("limit_bitmap_too_large", "A start whose serialized bitmap would exceed "
               "MAX_BITMAP_BYTES: a 2^64-1 byte disk at 512-byte granularity.", D,
               start(disk_size=spec.MAX_U64, granularity=spec.MIN_GRANULARITY), OPEN,
               f"limit is {spec.MAX_BITMAP_BYTES}", ErrorCode.LIMIT)

    # ---- chunk ranges
    unexpected("chunk_range_first", "first = 4 of a 4-chunk bitmap.", D, Zeroes(0, 4, 1),
               streaming(), "chunks [4, 5) outside [0, 4) of bitmap 0", ErrorCode.CHUNK_RANGE)
    unexpected("chunk_range_count", "chunks 2..5 of a 4-chunk bitmap.", D,
               Bits(0, 2, 3, int(Encoding.POSITIONS), b""), streaming(),
               "chunks [2, 5) outside [0, 4) of bitmap 0", ErrorCode.CHUNK_RANGE)
    unexpected("chunk_range_huge_count", "count near 2^64 must not overflow first + count.",
               D, Zeroes(0, 1, spec.MAX_U64), streaming(), "outside [0, 4) of bitmap 0",
               ErrorCode.CHUNK_RANGE)
    big = start(disk_size=1 << 40, granularity=4096, chunk_size=spec.MAX_CHUNK_SIZE)
    unexpected("chunk_range_payload_limit", "A bits frame may cover at most "
               "MAX_FRAME_PAYLOAD serialized bytes: 5 chunks of 1 MiB is too many.", D,
               Bits(0, 0, 5, int(Encoding.POSITIONS), b""), streaming(big),
               f"bits frame covers 5242880 bytes, limit is {spec.MAX_FRAME_PAYLOAD}",
               ErrorCode.CHUNK_RANGE)

    # ---- spans errors: the run list is a field (bad_field), then ranges, then payload
    def spans_err(name: str, desc: str, runs: bytes, data: bytes, code: ErrorCode, msg: str,
                  enc: int = Encoding.POSITIONS, st: Start | None = None,
                  by: str = "connection") -> None:
        ev = Spans(0, runs, int(enc), data)
        add(name, desc, D, encode_bytes(ev), [ev] if code is not ErrorCode.BAD_FIELD else [
            map_json(event_to_map(ev))], streaming(st), error=(code, msg), detected_by=by)

    lebs = encodings.leb128_encode
    spans_err("spans_runs_odd", "The run list must hold (skip, count) pairs: 3 numbers.",
              lebs(np.array([0, 1, 2])), b"", ErrorCode.BAD_FIELD, "must be (skip, count) pairs")
    spans_err("spans_runs_zero_count", "A run of 0 chunks.", lebs(np.array([0, 1, 1, 0])),
              b"", ErrorCode.BAD_FIELD, "a run of 0 chunks")
    spans_err("spans_runs_truncated", "The run list ends inside a varint.", b"\x00\x81",
              b"", ErrorCode.BAD_FIELD, "ends inside a varint")
    spans_err("spans_runs_too_many", f"{spec.MAX_SPAN_RUNS + 1} runs: more than "
              "MAX_SPAN_RUNS, refused before the geometry is looked at.",
              lebs(np.tile([0, 1], spec.MAX_SPAN_RUNS + 1)), b"", ErrorCode.BAD_FIELD,
              f"allowed at most {spec.MAX_SPAN_RUNS}")
    spans_err("spans_chunk_range", "A run past the last chunk: chunks 0 and 3..4 of a "
              "4-chunk bitmap.", encode_runs(np.array([0, 3]), np.array([1, 2])), b"",
              ErrorCode.CHUNK_RANGE, "spans run ends at chunk 5, outside [0, 4)")
    spans_err("spans_payload_limit", "Runs covering more than MAX_FRAME_PAYLOAD: 3 + 2 chunks "
              "of 1 MiB.", encode_runs(np.array([0, 4]), np.array([3, 2])), b"",
              ErrorCode.CHUNK_RANGE, f"spans frame covers 5242880 bytes, limit is "
              f"{spec.MAX_FRAME_PAYLOAD}", st=big)
    spans_err("spans_bad_payload_longer_than_raw", "The payload may not be longer than the "
              "runs' raw bytes (256 + 232).", encode_runs(np.array([0, 3]), np.array([1, 1])),
              bytes(489), ErrorCode.BAD_PAYLOAD, "encoded payload of 489 bytes exceeds the "
              "488 raw bytes")
    spans_err("spans_bad_payload_raw_length", "A RAW payload must be exactly the runs' raw "
              "bytes (512 here).", encode_runs(np.array([0, 2]), np.array([1, 1])),
              bytes(511), ErrorCode.BAD_PAYLOAD, "raw payload of 511 bytes, expected 512",
              enc=Encoding.RAW, by="assembly")
    spans_err("spans_bad_payload_padding_bit", "Payload bit 256 x 8 + 1850 is padding bit "
              "1850 of chunk 3 (the second run).",
              encode_runs(np.array([0, 3]), np.array([1, 1])),
              lebs(np.array([256 * 8 + 1850])), ErrorCode.BAD_PAYLOAD,
              "bits set past the end of the disk", by="assembly")
    unexpected("unexpected_spans_before_ready", "spans before the destination's ready.", D,
               Spans(0, encode_runs(np.array([0]), np.array([1])), int(Encoding.POSITIONS),
                     b""), (*OPEN, (S, start())),
               "source may not send spans for bitmap 0 in state started")

    # ---- payload errors
    def payload(name: str, desc: str, first: int, count: int, enc: int, data: bytes, msg: str,
                by: str = "assembly") -> None:
        ev = Bits(0, first, count, int(enc), data)
        add(name, desc, D, encode_bytes(ev), [ev], streaming(),
            error=(ErrorCode.BAD_PAYLOAD, msg), detected_by=by)

    payload("bad_payload_raw_length", "A RAW payload must be exactly the chunks' serialized "
            "size (256 bytes here).", 0, 1, Encoding.RAW, bytes(255),
            "raw payload of 255 bytes, expected 256")
    payload("bad_payload_raw_length_last_chunk", "The last chunk is 232 bytes, not 256.",
            3, 1, Encoding.RAW, bytes(256), "encoded payload of 256 bytes exceeds the 232 raw "
            "bytes", "connection")
    payload("bad_payload_longer_than_raw", "No encoded payload may be longer than the raw "
            "bytes it stands for.", 0, 1, Encoding.POSITIONS, b"\x00" * 257,
            "encoded payload of 257 bytes exceeds the 256 raw bytes", "connection")
    payload("bad_payload_varint_truncated", "POSITIONS payload ending inside a varint.",
            0, 1, Encoding.POSITIONS, b"\x03\x80", "payload ends inside a varint")
    payload("bad_payload_varint_too_long", "A varint longer than 5 bytes.", 0, 1,
            Encoding.POSITIONS, b"\x80\x80\x80\x80\x80\x00", "varint longer than 5 bytes")
    payload("bad_payload_positions_beyond", "Set bit 2048 of a 2048-bit chunk.", 0, 1,
            Encoding.POSITIONS, encodings.leb128_encode(np.array([5, 2042])),
            "set bit 2048 beyond the 2048 bits of the chunks")
    payload("bad_payload_padding_bit", "Bit 1850 of chunk 3 is padding (past bit 7989 of the "
            "disk): padding bits must be zero.", 3, 1, Encoding.POSITIONS,
            encodings.leb128_encode(np.array([1850])), "bits set past the end of the disk")
    payload("bad_payload_runs_sum", "Runs adding up to 2047 bits for a 2048-bit chunk.", 0, 1,
            Encoding.RUNS, encodings.leb128_encode(np.array([100, 1947])),
            "runs add up to 2047 bits, the chunks hold 2048")
    payload("bad_payload_runs_empty", "Only the first run may be empty.", 0, 1, Encoding.RUNS,
            encodings.leb128_encode(np.array([5, 0, 2043])), "only the first run may be empty")
    payload("bad_payload_zlib_bomb", "A zlib stream inflating to 100000 bytes for 256 raw "
            "bytes: inflation stops at the raw size.", 0, 1, Encoding.RAW | Encoding.ZLIB,
            zlib.compress(bytes(100000), 9), "inflates beyond the 256 raw bytes")
    payload("bad_payload_zlib_garbage", "Bytes that are no zlib stream.", 0, 1,
            Encoding.RAW | Encoding.ZLIB, b"\x00\x01\x02\x03", "zlib:")
    payload("bad_payload_zlib_truncated", "A zlib stream cut short.", 0, 1,
            Encoding.POSITIONS | Encoding.ZLIB, zlib.compress(bytes(100), 9)[:-4],
            "zlib payload is truncated or has trailing bytes")
    payload("bad_payload_zlib_trailing", "Bytes after the end of the zlib stream.", 0, 1,
            Encoding.POSITIONS | Encoding.ZLIB, zlib.compress(b"\x01", 9) + b"\x00",
            "zlib payload is truncated or has trailing bytes")
    payload("bad_payload_zlib_raw_short", "RAW|ZLIB inflating to fewer bytes than the chunks.",
            0, 1, Encoding.RAW | Encoding.ZLIB, zlib.compress(bytes(200), 9),
            "raw payload of 200 bytes, expected 256")

    # ---- verification at complete (whole sessions, through Assembly)
    sess = (*streaming(), (S, Zeroes(0, 0, 1)),
            (S, Bits(0, 1, 3, int(encodings.encode(bm.chunk_words_view(1, 3))[0]),
                     bytes(encodings.encode(bm.chunk_words_view(1, 3))[1]))))
    add("incomplete", "complete although chunk 3 never arrived.", D,
        encode_bytes(Complete(0, dig, 2)), [Complete(0, dig, 2)],
        (*streaming(), (S, Zeroes(0, 0, 3))),
        error=(ErrorCode.INCOMPLETE, "1 of 4 chunks never arrived"), detected_by="assembly")
    add("count_mismatch", "complete claims 3 set bits; the rebuild has 2.", D,
        encode_bytes(Complete(0, dig, 3)), [Complete(0, dig, 3)], sess,
        error=(ErrorCode.COUNT_MISMATCH, "rebuilt bitmap has 2 bits set, source says 3"),
        detected_by="assembly")
    add("digest_mismatch", "complete carries a digest that is not the rebuild's.", D,
        encode_bytes(Complete(0, bytes(32), 2)), [Complete(0, bytes(32), 2)], sess,
        error=(ErrorCode.DIGEST_MISMATCH, "differs from the source's 0000000000000000"),
        detected_by="assembly")
    add("closed", "The source closes the connection while a bitmap streams.", D, b"", [],
        streaming(), eof=True, error=(ErrorCode.CLOSED, "peer closed the connection in state "
                                      "open"), detected_by="eof")
    add("closed_before_end_answer", "The destination closes after the source's end without "
        "answering it.", S, b"", [], (*done, (S, End())), eof=True,
        error=(ErrorCode.CLOSED, "in state ending"), detected_by="eof")


# -- the worked example ----------------------------------------------------------------------

_SESSION: list[tuple[str, Event, bytes, str]] | None = None


def session_log_full() -> list[tuple[str, Event, bytes, str]]:
    """A complete session: one small bitmap (live=false) and one live bitmap, with a write
    during the dirty pass. Returns (sender, event, bytes, note) in wire order."""
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    log: list[tuple[str, Event, bytes, str]] = []

    def send(who: str, ev: Event, note: str = "") -> None:
        a, b = (src, dst) if who == S else (dst, src)
        data = b"".join(bytes(x) for x in a.send(ev))
        got = b.receive_data(data)
        assert len(got) == 1
        log.append((who, ev, data, note))

    small = DirtyBitmap(64 * GRAN * 4, GRAN, 8)  # 256 clusters -> 32 bytes, 4 chunks of 8
    small.set_bits(0, 3)
    small.set_bits(130, 131)
    live = DirtyBitmap(DISK, GRAN, CHUNK)  # 1000 bytes, 4 chunks of 256
    live.set_bits(10, 20)
    live.set_many(np.array([2100, 7000, 7989]))
    plans = {0: Planner(small, 0, 512), 1: Planner(live, 1, 512)}
    for p in plans.values():
        p.spans = True  # both peers announce spans-v1
    send(S, Hello(1, 1, S, spec.CAPABILITIES, AGENT), "source offers versions 1..1")
    send(D, Hello(1, 1, D, spec.CAPABILITIES, AGENT), "destination chose version 1")
    send(S, Start(0, "drive0", "small", small.disk_size, GRAN, 8, True, False, False),
         "small bitmap: live=false, 32 serialized bytes in 4 chunks of 8")
    send(S, Start(1, "drive0", "live", live.disk_size, GRAN, CHUNK, True, True, True),
         "live bitmap: 1000 serialized bytes in 4 chunks of 256 (last one 232)")
    send(D, Ready(0))
    send(D, Ready(1))
    for frames in plans[1].bulk():
        for f in frames:
            send(S, f, "bulk pass")
    send(S, Mark(1), "sync point after the bulk pass")
    send(D, Mark(1), "everything before the mark is applied")
    live.set_bits(5000, 5003)  # a guest write during the live phase: chunk 2 is dirty again
    for first, count in plans[1].dirty_runs():
        for f in plans[1].take(first, count):
            send(S, f, "dirty pass 1 (bits 5000..5002 were written after the bulk pass)")
    live.set_bits(300, 301)  # two more writes (chunks 0 and 3), then the source freezes
    live.set_bits(7500, 7501)
    for f in plans[1].take_dirty():
        send(S, f, "frozen completion: the last dirty chunks, 0 and 3, in one spans frame")
    send(S, Complete(1, tree_digest(live.words.data), live.count()),
         f"live bitmap: {live.count()} bits set")
    for f in plans[0].take_all():
        send(S, f, "small bitmap sent whole at completion")
    send(S, Complete(0, tree_digest(small.words.data), small.count()),
         f"small bitmap: {small.count()} bits set")
    # The destination's view: rebuild, verify, (store), ack.
    asm = {0: Assembly(next(e for w, e, _, _ in log if type(e) is Start and e.id == 0)),
           1: Assembly(next(e for w, e, _, _ in log if type(e) is Start and e.id == 1))}
    for _, e, _, _ in log:
        if type(e) in (Bits, Zeroes, Spans):
            asm[e.id].apply(e)
    for i in (1, 0):
        c = next(e for _, e, _, _ in log if type(e) is Complete and e.id == i)
        send(D, Ack(i, asm[i].verify(c)), "verified and stored durably: handoff")
    send(S, End())
    send(D, End())
    assert src.state.value == dst.state.value == "closed"
    _SESSION = log
    return log


def session_log() -> list[tuple[str, Event, bytes]]:
    return [(w, e, h) for w, e, h, _ in session_log_full()]


def add_sessions() -> None:
    log = session_log()
    add("session_worked_example", "The worked example of PROTOCOL.md as seen by the "
        "destination: the handshake is context, then everything the source sends after the "
        "destination's hello up to its first wait (both starts).", D,
        b"".join(h for w, _, h in log[2:4]), [e for _, e, _ in log[2:4]], tuple(
            (w, e) for w, e, _ in log[:2]))
    # Everything the source sends after both readies, up to end (no destination frame is
    # needed in between): the bulk pass, a dirty pass, completion.
    i = next(k for k, (w, e, _) in enumerate(log) if type(e) is Ack)
    add("session_worked_example_stream", "The worked example's stream, destination view: "
        "bulk pass, dirty pass, frozen completion of both bitmaps, checked by Assembly.", D,
        b"".join(h for _, _, h in log[6:i]), [e for _, e, _ in log[6:i]],
        tuple((w, e) for w, e, _ in log[:6]))
    add("session_worked_example_acks", "The worked example, source view: both acks (the "
        "handoff of each bitmap).", S,
        b"".join(h for _, _, h in log[i : i + 2]), [e for _, e, _ in log[i : i + 2]],
        tuple((w, e) for w, e, _ in log[:i]))


# -- checking ----------------------------------------------------------------------------------


def event_from_json(m: dict[str, Any]) -> Event:
    kind = Kind[m["kind"].upper()]
    args: dict[str, Any] = {}
    for f in spec.FIELDS[kind]:
        if f.name in m:
            v = m[f.name]
            args[f.name] = bytes.fromhex(v) if f.type is bytes else (
                tuple(v) if f.type is list else v)
    return EVENT_TYPES[kind](**args)


def check(v: dict[str, Any]) -> None:
    """Replay a vector: on the destination through the real DestinationSession (in
    memory), whose frames must be the context's and whose refusals are per-bitmap
    errors; on the source through a Connection."""
    role = Role(v["role"])
    dest = MemoryDestination(hold=True) if role is Role.DESTINATION else None
    conn = dest.conn if dest is not None else Connection(role)

    def receive(data: bytes) -> list[Event]:
        if dest is None:
            return conn.receive_data(data)
        refused = len(dest.refused)
        out = [e for e in dest.receive(data) if type(e) is not BitmapFailed]
        if len(dest.refused) > refused:
            r = dest.refused[refused]
            raise RemoteProtocolError(r.code, r.message, r.id)
        return out

    for c in v["context"]:
        ev = event_from_json(c["frame"])
        if c["sender"] == role.value and dest is not None:
            got = dest.release()
            if type(ev) is Hello:  # the agent string is this implementation's own
                got, ev = replace(got, agent=None), replace(ev, agent=None)
            assert got == ev, (v["name"], got, ev)
        elif c["sender"] == role.value:
            assert b"".join(bytes(b) for b in conn.send(ev)).hex() == c["hex"]
        else:
            receive(bytes.fromhex(c["hex"]))
    got: list[Event] = []
    err: ProtocolError | None = None
    try:
        for piece in pieces(bytes.fromhex(v["hex"])):
            got += receive(piece)
        if v["eof"]:
            if dest is not None:
                dest.receive_eof()
            else:
                conn.receive_eof()
    except ProtocolError as e:
        err = e
    want = v["error"]
    if want is None:
        assert err is None, (v["name"], err)
        assert [event_json(e) for e in got] == v["frames"], v["name"]
    else:
        assert err is not None, v["name"]
        assert (str(err.code), want["message_contains"] in err.message) == (
            want["code"], True), (v["name"], err)
        assert [event_json(e) for e in got] == v["frames"][: len(got)], v["name"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", action="store_true", help="print the worked example")
    ap.add_argument("--out", type=Path, default=OUT, help="directory to write")
    args = ap.parse_args()
    if args.example:
        print_example()
        return 0
    build()
    add_sessions()
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "duplicate vector names"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    for v in VECTORS:
        check(v)
        (out / f"{v['name']}.json").write_text(json.dumps(v, indent=1) + "\n")
    print(f"wrote {len(VECTORS)} vectors to {out}")
    return 0


def print_example() -> None:
    for n, (who, ev, data, note) in enumerate(session_log_full(), 1):
        arrow = "S → D" if who == S else "D → S"
        m = event_json(ev)
        fields = ", ".join(f"{k}={json.dumps(x)}" for k, x in m.items() if k != "kind")
        print(f"**{n}. {arrow} `{m['kind']}`** ({len(data)} bytes){': ' + note if note else ''}")
        print()
        print(f"    {fields}" if fields else "    (no fields)")
        print()
        print("```")
        for i in range(0, len(data), 32):
            print(data[i : i + 32].hex(" "))
        print("```")
        print()


if __name__ == "__main__":
    sys.exit(main())
