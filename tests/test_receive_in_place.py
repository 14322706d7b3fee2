"""Receiving bits payloads in place (Connection.receive_buffer/received_into with a
landing, Assembly.landing): the same events, bitmaps and errors as the buffered path."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import DigestCache, tree_digest
from bitmig.protocol import spec
from bitmig.protocol.codec import encode_bytes
from bitmig.protocol.connection import LAND_MIN, Connection
from bitmig.protocol.errors import ProtocolError
from bitmig.protocol.events import BitmapFailed, Bits, Complete, Event, Hello, Ready, Start, Zeroes
from bitmig.protocol.spec import Encoding, Role

CHUNK = 1024
DISK = 1 << 40  # 2 MiB bitmap at 64 KiB: 2,048 chunks of 1 KiB


def start(bid: int = 0) -> Start:
    return Start(bid, "n", f"b{bid}", DISK, 65536, CHUNK, True, False, True)


def random_bitmap(seed: int) -> DirtyBitmap:
    bm = DirtyBitmap(DISK, 65536, CHUNK)
    bm.fill_random(0.5, np.random.default_rng(seed))
    return bm


def stream(frames: list[Event]) -> bytes:
    return b"".join(encode_bytes(f) for f in frames)


def feed_in_place(conn: Connection, data: bytes, rng: np.random.Generator) -> list:
    """Deliver `data` as recv_into would: into receive_buffer(), pieces of random size."""
    events, pos = [], 0
    while pos < len(data):
        buf = conn.receive_buffer()
        n = min(len(buf), len(data) - pos, int(rng.integers(1, 200_000)))
        buf[:n] = data[pos : pos + n]
        pos += n
        events += conn.received_into(n)
    return events


def opened() -> Connection:
    """A destination's connection after both hellos, bitmap 0 started and ready."""
    conn = Connection(Role.DESTINATION)
    conn.receive_data(encode_bytes(Hello(1, 1, "source")))
    conn.send(Hello(1, 1, "destination"))
    conn.receive_data(encode_bytes(start(0)))
    conn.send(Ready(0))
    return conn


def plain(frames: list[Event]) -> list:
    return opened().receive_data(stream(frames))


def same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if type(x) is Bits:
            assert (x.id, x.first, x.count, x.enc) == (y.id, y.first, y.count, y.enc)
            assert bytes(x.data) == bytes(y.data)
        else:
            assert x == y


def test_events_equal_the_buffered_path_and_payloads_land_in_place() -> None:
    bm = random_bitmap(1)
    big = (LAND_MIN + 4096) // CHUNK  # claimed: larger than LAND_MIN
    frames: list[Event] = [
        Bits(0, 0, big, int(Encoding.RAW), bm.serialize(0, big)),
        Bits(0, big, 3, int(Encoding.RAW), bm.serialize(big, 3)),  # small: buffered
        Zeroes(0, big + 3, 5),
        Bits(0, 200, 400, int(Encoding.RAW | Encoding.ZLIB),  # claimed, not landed
             zlib.compress(bm.serialize(200, 100).tobytes() + bytes(300 * CHUNK), 1)),
        Bits(0, bm.nchunks - big, big, int(Encoding.RAW), bm.serialize(bm.nchunks - big, big)),
    ]
    target = bytearray(bm.serialized_size)
    asked: list[Bits] = []

    def landing(ev: Bits) -> memoryview | None:
        asked.append(ev)
        if ev.enc != Encoding.RAW:
            return None
        return memoryview(target)[ev.first * CHUNK : (ev.first + ev.count) * CHUNK]

    for seed in range(5):
        conn = opened()
        conn.landing = landing
        asked.clear()
        target[:] = bytes(len(target))
        got = feed_in_place(conn, stream(frames),
                            np.random.default_rng(seed))
        same(got, plain(frames))
        assert [(e.first, e.count) for e in asked] == [(0, big), (200, 400),
                                                         (bm.nchunks - big, big)]
        # The landed payloads are the events' data: the bytes went straight to target.
        assert got[0].data.obj is target and got[-1].data.obj is target
        assert target[: big * CHUNK] == bm.serialize(0, big)
        assert conn.buffered == 0 and conn.frames_received["bits"] == 4


@pytest.mark.parametrize("bad", ["range", "unknown_id", "too_long", "wrong_kind_state"])
def test_bad_heads_are_never_landed_and_fail_as_in_the_buffered_path(bad: str) -> None:
    big = 2 * LAND_MIN // CHUNK
    payload = bytes(big * CHUNK)
    frame = {
        "range": Bits(0, 2040, big, 0, payload),  # chunks past the end of the bitmap
        "unknown_id": Bits(7, 0, big, 0, payload),
        "too_long": Bits(0, 0, big, 0, payload + b"x"),  # longer than its chunks
        "wrong_kind_state": Complete(0, b"d" * 32, 0),
    }[bad]
    frames = [frame, Zeroes(0, 0, 1)]

    def outcome(conn: Connection, feed) -> tuple[list, str | None]:
        try:
            return feed(conn), None
        except ProtocolError as e:
            return [], f"{e.code}: {e.message}"

    data = stream(frames)
    ref = outcome(opened(), lambda c: c.receive_data(data))

    def never(ev: Bits) -> memoryview | None:
        raise AssertionError("a frame that fails its checks was offered for landing")

    conn = opened()
    conn.landing = never
    got = outcome(conn, lambda c: feed_in_place(c, data, np.random.default_rng(3)))
    assert got[1] == ref[1]
    same(got[0], ref[0])
    if bad in ("too_long", "unknown_id"):
        assert any(type(e) is BitmapFailed for e in got[0]) or got[1] is not None


def test_stream_ending_inside_a_landed_payload_is_truncated() -> None:
    big = 2 * LAND_MIN // CHUNK
    data = stream([Bits(0, 0, big, 0, bytes(big * CHUNK))])
    conn = opened()
    target = bytearray(big * CHUNK)
    conn.landing = lambda ev: memoryview(target)
    feed_in_place(conn, data[:-100], np.random.default_rng(0))
    assert conn.buffered > LAND_MIN
    with pytest.raises(ProtocolError) as err:
        conn.receive_eof()
    assert err.value.code == spec.ErrorCode.TRUNCATED


def test_assembly_landing_equals_deserialize_and_abandon_clears() -> None:
    src = random_bitmap(2)
    st = start(0)
    ref, asm = Assembly(st), Assembly(st)
    n = 256
    for first in (0, 512, src.nchunks - n, 512):  # 512 twice: an overwrite, not fresh
        data = src.serialize(first, n)
        ref.apply(Bits(0, first, n, 0, data))
        view = asm.landing(Bits(0, first, n, 0, data))
        assert view is not None and view.nbytes == data.nbytes
        view[:] = data  # what recv_into does
        asm.apply(Bits(0, first, n, 0, view))
    assert np.array_equal(asm.bitmap.words, ref.bitmap.words)
    assert asm.bitmap.count() == ref.bitmap.count() == int(
        np.bitwise_count(ref.bitmap.words).sum())
    assert asm.digests.digest() == ref.digests.digest() == tree_digest(asm.bitmap.words.data)
    assert np.array_equal(asm.received, ref.received)
    # Not raw, or a second landing while one is open: no landing.
    assert asm.landing(Bits(0, 0, n, int(Encoding.POSITIONS), b"\x00")) is None
    # A payload cut short: its chunks are cleared and count as not received.
    view = asm.landing(Bits(0, 0, n, 0, src.serialize(0, n)))
    assert asm.landing(Bits(0, 1024, 1, 0, src.serialize(1024, 1))) is None
    view[: 1000] = b"\xff" * 1000
    asm.abandon()
    assert not asm.bitmap.chunk_words_view(0, n).any() and not asm.received[:n].any()
    assert asm.received[512] and asm.missing() == src.nchunks - 2 * n  # [512, 768), the end
    assert asm.bitmap.count() == int(np.bitwise_count(asm.bitmap.words).sum())
    assert DigestCache(asm.bitmap).digest() == asm.digests.digest()


def test_landed_bits_past_the_end_of_the_disk_fail_the_bitmap() -> None:
    st = Start(0, "n", "b", (1 << 40) - 65536, 65536, CHUNK, True, False, True)
    asm = Assembly(st)
    last = asm.bitmap.nchunks - 1
    view = asm.landing(Bits(0, last, 1, 0, bytes(CHUNK)))
    assert view is not None
    view[:] = b"\xff" * CHUNK
    with pytest.raises(ProtocolError) as err:
        asm.apply(Bits(0, last, 1, 0, view))
    assert err.value.code == spec.ErrorCode.BAD_PAYLOAD and err.value.bitmap_id == 0


async def test_a_migration_lands_every_raw_payload_in_the_destination_bitmap(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through real daemons (sockets, spools): each raw bits payload is received into
    the assembly's bitmap, and the stored bitmap equals the source's."""
    from bitmig.daemon.service import Daemon
    from bitmig.session.source import MigrationOptions

    landed: list[tuple[int, int]] = []
    real = Assembly.landing

    def spy(self: Assembly, frame: Bits) -> memoryview | None:
        view = real(self, frame)
        if view is not None:
            landed.append((frame.first, frame.count))
        return view

    monkeypatch.setattr(Assembly, "landing", spy)
    dest = Daemon("destination", str(tmp_path / "d"))
    _, port = await dest.listen("127.0.0.1", 0)
    src = Daemon("source", options=MigrationOptions(small_threshold=0))
    e = src.registry.add("n", "b", 1 << 42, 65536)  # 8 MiB: several frames
    e.bitmap.fill_random(0.5, np.random.default_rng(5))
    r = await src.migrate("127.0.0.1", port)
    assert r.ok, r.error
    assert len(landed) == r.frames["bits"] > 1  # every frame, in place
    assert sum(n for _, n in landed) == e.bitmap.nchunks
    got = dest.registry.get("n", "b").bitmap
    assert np.array_equal(got.words, e.bitmap.words)
    assert got.count() == e.bitmap.count()
