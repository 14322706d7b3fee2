"""Two protocol endpoints joined in memory: sessions, framing and validation errors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import DigestCache
from bitmig.core.planner import Planner
from bitmig.protocol import encodings, spec
from bitmig.protocol.codec import encode_bytes
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import LocalProtocolError, RemoteProtocolError
from bitmig.protocol.events import (
    Ack,
    BitmapFailed,
    Bits,
    Complete,
    End,
    Error,
    Hello,
    Ready,
    Start,
    Zeroes,
)
from bitmig.protocol.spec import ErrorCode, Role
from bitmig.protocol.state import BitmapState, ConnState


def hello(role: str, version: int = 1, min_version: int = 1) -> Hello:
    return Hello(version, min_version, role, ("x",), "test")


def pair() -> tuple[Connection, Connection]:
    return Connection(Role.SOURCE), Connection(Role.DESTINATION)


def xfer(a: Connection, b: Connection, event, chunked: int = 0) -> list:
    data = b"".join(bytes(x) for x in a.send(event))
    if not chunked:
        return b.receive_data(data)
    out = []
    for i in range(0, len(data), chunked):
        out += b.receive_data(data[i : i + chunked])
    return out


def opened() -> tuple[Connection, Connection]:
    s, d = pair()
    xfer(s, d, hello("source"))
    xfer(d, s, hello("destination"))
    return s, d


START = Start(0, "drive0", "bitmap0", 1 << 34, 65536, 1024, True, False, True)


def test_full_session_rebuilds_the_bitmap_byte_by_byte() -> None:
    rng = np.random.default_rng(0)
    src = DirtyBitmap(1 << 36, 65536, 64)
    src.set_many(rng.integers(0, src.nbits, 3000))
    src.set(1 << 34, 1 << 33)  # a long run of ones
    s, d = opened()
    st_ = Start(7, "n", "b", src.disk_size, src.granularity, src.chunk_size, True, True, True)
    (ev,) = xfer(s, d, st_)
    asm = Assembly(ev)
    xfer(d, s, Ready(7))
    frames = Planner(src, 7, frame_payload=4096).take_all()
    kinds = {type(f) for f in frames}
    assert kinds == {Bits, Zeroes} or Bits in kinds
    for f in frames:
        for got in xfer(s, d, f, chunked=7):  # frames split at arbitrary byte boundaries
            asm.apply(got)
    c = Complete(7, DigestCache(src).digest(), src.count())
    (got,) = xfer(s, d, c)
    digest = asm.verify(got)
    assert np.array_equal(asm.bitmap.words, src.words)
    xfer(d, s, Ack(7, digest))
    assert s.bitmap_state(7) is BitmapState.DONE
    xfer(s, d, End())
    xfer(d, s, End())
    assert s.state is d.state is ConnState.CLOSED
    s.receive_eof()
    d.receive_eof()


def test_all_encodings_are_used_and_round_trip() -> None:
    patterns = {
        "dense": np.random.default_rng(1).integers(0, 2**63, 512, dtype=np.uint64),
        "sparse": np.where(np.arange(512) % 97 == 0, np.uint64(1 << 5), np.uint64(0)),
        "runs": np.where(np.arange(512) < 300, np.uint64(2**64 - 1), np.uint64(0)),
    }
    seen = set()
    for words in patterns.values():
        w = words.astype("<u8")
        enc, data = encodings.encode(w)
        seen.add(enc & ~spec.Encoding.ZLIB)
        assert np.array_equal(np.frombuffer(encodings.decode(enc, data, w.nbytes), "<u8"), w)
    assert seen == {spec.Encoding.RAW, spec.Encoding.POSITIONS, spec.Encoding.RUNS}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64),
       st.floats(0, 1))
def test_encodings_round_trip(words: list[int], density: float) -> None:
    w = np.array(words, dtype="<u8")
    w[np.random.default_rng(len(words)).random(w.size) > density] = 0
    enc, data = encodings.encode(w)
    assert len(data) <= w.nbytes
    assert np.array_equal(np.frombuffer(encodings.decode(enc, data, w.nbytes), "<u8"), w)


@pytest.mark.parametrize(("enc", "data", "msg"), [
    (spec.Encoding.RAW, b"\0" * 7, "raw payload"),
    (spec.Encoding.POSITIONS, b"\x80", "inside a varint"),
    (spec.Encoding.POSITIONS, b"\xff\xff\xff\xff\xff\x01", "longer than"),
    (spec.Encoding.POSITIONS, b"\x40", "beyond"),
    (spec.Encoding.RUNS, b"\x01", "add up"),
    (spec.Encoding.RUNS, b"\x00\x00\x40", "only the first run"),
    (spec.Encoding.RAW | spec.Encoding.ZLIB, b"garbage", "zlib"),
])
def test_bad_payloads(enc: int, data: bytes, msg: str) -> None:
    with pytest.raises(RemoteProtocolError, match=msg) as e:
        encodings.decode(enc, data, 8)
    assert e.value.code is ErrorCode.BAD_PAYLOAD


def test_zlib_bomb_is_bounded() -> None:
    import zlib
    bomb = zlib.compress(b"\0" * (64 << 20))
    with pytest.raises(RemoteProtocolError, match="inflates beyond"):
        encodings.decode(spec.Encoding.RAW | spec.Encoding.ZLIB, bomb, 1024)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(("data", "code", "msg"), [
    (b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE, "frame length"),
    (b"\0\0\0\0", ErrorCode.FRAME_TOO_LARGE, "frame length 0"),
    (frame(b"\xc1"), ErrorCode.MALFORMED, "not msgpack"),
    (frame(msgpack.packb([1, 2])), ErrorCode.MALFORMED, "must be a msgpack map"),
    (frame(msgpack.packb({"kind": 1}) + b"\x00"), ErrorCode.MALFORMED, "bytes after"),
    (frame(msgpack.packb({"kind": 99})), ErrorCode.UNKNOWN_KIND, "unknown frame kind 99"),
    (frame(msgpack.packb({"kind": "hello"})), ErrorCode.BAD_FIELD, "kind must be"),
    (frame(msgpack.packb({"x": 1})), ErrorCode.BAD_FIELD, "no kind"),
    (frame(msgpack.packb({"kind": 1, "version": 1, "min_version": 1, "role": "source"})),
     ErrorCode.BAD_FIELD, "lacks the field 'caps'"),
    (frame(msgpack.packb({"kind": 1, "version": "1", "min_version": 1, "role": "source",
                          "caps": []})), ErrorCode.BAD_FIELD, "hello.version must be"),
    (frame(msgpack.packb({"kind": 1, "version": 1, "min_version": 1, "role": "source",
                          "caps": [1]})), ErrorCode.BAD_FIELD, "caps items"),
    (encode_bytes(Hello(9, 5, "source")), ErrorCode.VERSION, "versions 5..9"),
    (encode_bytes(Hello(1, 1, "destination")), ErrorCode.BAD_FIELD, "hello.role"),
    (encode_bytes(Ready(0)), ErrorCode.UNEXPECTED, "may not send ready"),
])
def test_destination_rejects_bad_first_frames(data: bytes, code: ErrorCode, msg: str) -> None:
    d = Connection(Role.DESTINATION)
    with pytest.raises(RemoteProtocolError, match=msg) as e:
        d.receive_data(data)
    assert e.value.code is code
    assert d.state is ConnState.FAILED


def test_unknown_fields_are_ignored() -> None:
    d = Connection(Role.DESTINATION)
    body = msgpack.packb({"kind": 1, "version": 1, "min_version": 1, "role": "source",
                          "caps": [], "future": {"x": [1, 2]}})
    (ev,) = d.receive_data(frame(body))
    assert ev == Hello(1, 1, "source", ())


@pytest.mark.parametrize(("event", "code", "msg"), [
    (Bits(0, 0, 1, 0, b"\0" * 1024), ErrorCode.UNEXPECTED, "in state started"),
    (Start(0, "n", "b", 1 << 30, 65536, 1024, True, False, True), ErrorCode.DUPLICATE_ID,
     "already started"),
    (Zeroes(5, 0, 1), ErrorCode.UNKNOWN_BITMAP, "never started"),
    (Start(1, "n", "b", 1 << 62, 512, 1024, True, False, True), ErrorCode.LIMIT, "limit is"),
    (End(), ErrorCode.UNEXPECTED, "unfinished"),
])
def test_state_violations(event, code: ErrorCode, msg: str) -> None:
    s, d = opened()
    xfer(s, d, START)
    expect_violation(d, encode_bytes(event), code, msg)


def expect_violation(d: Connection, data: bytes, code: ErrorCode, msg: str) -> None:
    """A fatal error raises; one bitmap's error is an event and the connection goes on."""
    if code not in spec.BITMAP_ERRORS:
        with pytest.raises(RemoteProtocolError, match=msg) as e:
            d.receive_data(data)
        assert e.value.code is code
        assert d.state is ConnState.FAILED
        return
    (ev,) = d.receive_data(data)
    assert type(ev) is BitmapFailed and ev.code == code and msg in ev.message, ev
    assert d.state is ConnState.OPEN


@pytest.mark.parametrize(("event", "code", "msg"), [
    (Zeroes(0, 32, 1), ErrorCode.CHUNK_RANGE, "outside"),
    (Zeroes(0, 2, 2**64 - 3), ErrorCode.CHUNK_RANGE, "outside"),
    (Bits(0, 0, 1, 0, b"\0" * 1025), ErrorCode.BAD_PAYLOAD, "payload of 1025 bytes exceeds"),
    (Bits(0, 0, 1, 1, b"\0" * 2000), ErrorCode.BAD_PAYLOAD, "exceeds"),
])
def test_range_and_payload_checks(event, code: ErrorCode, msg: str) -> None:
    s, d = opened()
    xfer(s, d, START)  # 16 GiB disk at 64 KiB: 32 chunks of 1 KiB
    xfer(d, s, Ready(0))
    expect_violation(d, encode_bytes(event), code, msg)


def test_sender_side_is_checked_too() -> None:
    s, _ = pair()
    with pytest.raises(LocalProtocolError):
        s.send(Start(0, "n", "b", 1, 512, 8, True, False, True))  # before hello


def test_truncated_stream_and_early_close() -> None:
    _s, d = opened()
    data = encode_bytes(START)
    d.receive_data(data[:-3])
    with pytest.raises(RemoteProtocolError, match="inside a frame") as e:
        d.receive_eof()
    assert e.value.code is ErrorCode.TRUNCATED
    _s2, d2 = opened()
    with pytest.raises(RemoteProtocolError) as e:
        d2.receive_eof()
    assert e.value.code is ErrorCode.CLOSED


def test_bitmap_error_fails_only_that_bitmap() -> None:
    s, d = opened()
    xfer(s, d, START)
    xfer(s, d, Start(1, "n", "c", 1 << 30, 65536, 1024, True, False, True))
    out = d.error_frame(RemoteProtocolError(ErrorCode.EXISTS, "exists", 0))
    (err,) = s.receive_data(b"".join(bytes(x) for x in out))
    assert err == Error("exists", "exists", 0)
    assert s.bitmap_state(0) is BitmapState.FAILED
    xfer(d, s, Ready(1))
    assert s.state is ConnState.OPEN
    # Frames still in flight for the failed bitmap are tolerated.
    d.receive_data(encode_bytes(Zeroes(0, 0, 2)))  # bitmap 0 failed: dropped quietly


def test_bitmap_failure_is_an_event_in_order() -> None:
    """Frames before and after a frame that breaks one bitmap come in one call, in order,
    with the failure between them; nothing is held back for a later call."""
    s, d = opened()
    xfer(s, d, START)
    xfer(d, s, Ready(0))
    good, bad = Zeroes(0, 0, 1), Bits(0, 1, 1, 1, b"\0" * 2000)
    out = d.receive_data(encode_bytes(good) + encode_bytes(bad) + encode_bytes(Zeroes(0, 2, 1)))
    assert out[0] == good and type(out[1]) is BitmapFailed and out[2] == Zeroes(0, 2, 1)
    assert (out[1].id, out[1].code) == (0, ErrorCode.BAD_PAYLOAD)
    assert d.bitmap_state(0) is BitmapState.FAILED  # the third frame: in flight, ignored
    assert d.receive_data(b"") == [] and d.state is ConnState.OPEN


def test_bits_frame_fast_path_equals_packb() -> None:
    for n in (0, 5, 255, 256, 65535, 65536, 100_000):
        ev = Bits(3, 2**40, 17, 0, memoryview(bytes(range(256)) * (n // 256 + 1))[:n])
        body = msgpack.packb({"kind": 4, "id": 3, "first": 2**40, "count": 17, "enc": 0,
                              "data": bytes(ev.data)}, use_bin_type=True)
        assert encode_bytes(ev) == frame(body)


def test_decoder_buffer_stays_bounded() -> None:
    s, d = opened()
    xfer(s, d, START)
    xfer(d, s, Ready(0))
    for _ in range(3000):
        xfer(s, d, Zeroes(0, 0, 1), chunked=3)
    assert d.buffered == 0
    assert len(d._buf) < 64
