"""Spans frames (many runs of chunks in one frame) and compression by link rate: the run
list, the codec, the connection's checks, the planner's grouping, the destination's
apply (against a per-run reference), and the encoder's choice on slow and fast links."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from bitmig.core import defaults
from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.core.planner import Planner
from bitmig.protocol import encodings, spec
from bitmig.protocol.codec import decode_body, encode_bytes, event_to_map
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from bitmig.protocol.events import Bits, Hello, Ready, Spans, Start, Zeroes
from bitmig.protocol.runs import decode_runs, encode_runs, raw_bytes
from bitmig.protocol.spec import Encoding, ErrorCode, Role
from bitmig.session import destination as ds

GRAN, CHUNK = 65536, 1024
DISK = (4096 * CHUNK * 8 - 100 * 64 - 5) * GRAN  # 4096 chunks, the last one 224 bytes


def scattered(seed: int, n: int, nchunks: int) -> list[tuple[int, int]]:
    """`n` random disjoint runs of 1..3 chunks, ascending."""
    rng = np.random.default_rng(seed)
    firsts = np.sort(rng.choice(nchunks // 4, n, replace=False)) * 4
    counts = rng.integers(1, 4, n)
    counts = np.minimum(counts, nchunks - firsts)
    return list(zip(firsts.tolist(), counts.tolist(), strict=True))


def random_bitmap(seed: int, density: float = 0.01) -> DirtyBitmap:
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    bm.fill_random(density, np.random.default_rng(seed))
    return bm


# -- the run list ---------------------------------------------------------------------


def test_runs_round_trip_and_raw_bytes() -> None:
    runs = [*scattered(1, 500, 4096), (4095, 1)]
    firsts = np.array([f for f, _ in runs])
    counts = np.array([c for _, c in runs])
    got_f, got_c = decode_runs(encode_runs(firsts, counts))
    assert got_f.tolist() == firsts.tolist() and got_c.tolist() == counts.tolist()
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    want = sum(bm.chunk_bytes(f, c) for f, c in runs)  # the last chunk is short
    assert raw_bytes(firsts, counts, bm.serialized_size, CHUNK) == want < counts.sum() * CHUNK


@pytest.mark.parametrize(("numbers", "message"), [
    ([0, 1, 2], "(skip, count) pairs"),
    ([0, 1, 3, 0], "a run of 0 chunks"),
    ([], "(skip, count) pairs"),
    ([0, 1] * (spec.MAX_SPAN_RUNS + 1), f"at most {spec.MAX_SPAN_RUNS}"),
])
def test_bad_run_lists_are_bad_field(numbers: list[int], message: str) -> None:
    with pytest.raises(RemoteProtocolError) as e:
        decode_runs(encodings.leb128_encode(np.array(numbers, dtype=np.int64)))
    assert e.value.code is ErrorCode.BAD_FIELD and message in e.value.message


def test_codec_encodes_spans_canonically_and_checks_runs() -> None:
    ev = Spans(7, encode_runs(np.array([2, 9]), np.array([1, 3])), int(Encoding.RAW),
               bytes(range(256)) * 16)
    data = encode_bytes(ev)
    assert data[4:] == msgpack.packb(event_to_map(ev), use_bin_type=True)
    assert decode_body(data[4:]) == ev
    body = msgpack.packb({"kind": 11, "id": 0, "runs": b"\x00\x00", "enc": 0, "data": b""})
    with pytest.raises(RemoteProtocolError) as e:
        decode_body(body)
    assert e.value.code is ErrorCode.BAD_FIELD


# -- the connection -------------------------------------------------------------------


def streaming(caps: tuple[str, ...] = spec.CAPABILITIES) -> tuple[Connection, Connection]:
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    st = Start(0, "drive0", "b", DISK, GRAN, CHUNK)
    for a, b, ev in ((src, dst, Hello(1, 1, "source", spec.CAPABILITIES)),
                     (dst, src, Hello(1, 1, "destination", caps)),
                     (src, dst, st), (dst, src, Ready(0))):
        b.receive_data(b"".join(bytes(x) for x in a.send(ev)))
    return src, dst


def test_spans_never_go_to_a_peer_without_the_capability() -> None:
    src, _ = streaming(caps=("encodings-v1", "tree-blake3"))
    ev = Spans(0, encode_runs(np.array([0]), np.array([1])), int(Encoding.POSITIONS), b"")
    with pytest.raises(LocalProtocolError) as e:
        src.send(ev)
    assert e.value.code is ErrorCode.UNEXPECTED and spec.CAP_SPANS in e.value.message


def test_connection_checks_runs_against_the_geometry() -> None:
    src, dst = streaming()
    ok = Spans(0, encode_runs(np.array([0, 4095]), np.array([1, 1])),
               int(Encoding.POSITIONS), b"")
    assert dst.receive_data(b"".join(bytes(x) for x in src.send(ok))) == [ok]
    past = Spans(0, encode_runs(np.array([4094]), np.array([3])), int(Encoding.POSITIONS), b"")
    with pytest.raises(ProtocolError) as e:
        dst.receive_data(encode_bytes(past))
    assert e.value.code is ErrorCode.CHUNK_RANGE


# -- planner and assembly ---------------------------------------------------------------


def apply_all(asm: Assembly, frames: list) -> None:
    for f in frames:
        asm.apply(f)


def test_scattered_runs_travel_together_and_rebuild_exactly() -> None:
    bm = random_bitmap(2)
    runs = [*scattered(3, 700, bm.nchunks), (bm.nchunks - 1, 1)]
    for f, c in runs:
        bm.meta.flags[f : f + c] = True
    p = Planner(bm, 0, 64 * 1024)
    p.spans = True
    frames = p.take_runs(runs)
    assert all(type(f) is Spans for f in frames)
    raw = sum(bm.chunk_bytes(f, c) for f, c in runs)
    assert len(frames) <= -(-raw // (64 * 1024)) + 1  # one frame per 64 KiB, not per run
    assert bm.meta.count() == 0  # every run read and cleared
    # The destination holds an older version of every chunk; spans bring it up to date.
    asm = Assembly(Start(0, "drive0", "b", DISK, GRAN, CHUNK))
    old = random_bitmap(4)
    asm.bitmap.deserialize(0, bm.nchunks, old.words)
    asm.received[:] = True
    want = old.words.copy()
    for f, c in runs:
        lo, hi = f * bm.chunk_words, min((f + c) * bm.chunk_words, bm.nwords)
        want[lo:hi] = bm.words[lo:hi]
    apply_all(asm, frames)
    assert np.array_equal(asm.bitmap.words, want)
    assert asm.bitmap.count() == int(np.bitwise_count(want).sum())
    assert asm.digests.digest() == tree_digest(want.data)


def test_without_the_capability_each_run_is_its_own_frame() -> None:
    bm = random_bitmap(5)
    runs = scattered(6, 50, bm.nchunks)
    frames = Planner(bm, 0).take_runs(runs)
    assert {type(f) for f in frames} <= {Bits, Zeroes} and len(frames) >= len(runs)


def test_spans_payload_errors_name_the_bitmap() -> None:
    asm = Assembly(Start(3, "drive0", "b", DISK, GRAN, CHUNK))
    bad = Spans(3, encode_runs(np.array([0, 2]), np.array([1, 1])), int(Encoding.RAW),
                bytes(2 * CHUNK - 8))
    with pytest.raises(RemoteProtocolError) as e:
        asm.apply(bad)
    assert (e.value.code, e.value.bitmap_id) == (ErrorCode.BAD_PAYLOAD, 3)
    assert asm.missing() == asm.bitmap.nchunks  # nothing counted as received


def test_destination_writes_each_run_once_and_refreshes_once() -> None:
    """The destination session: one spool write per run, at the run's offset, with the
    run's final bytes; the digest is current after the frame."""
    intake = ds.Intake(1 << 30, durable=True)
    sess = ds.DestinationSession(intake, _NoStore(), "peer")
    st = Start(0, "drive0", "b", DISK, GRAN, CHUNK)
    sess.handle(Hello(1, 1, "source", spec.CAPABILITIES), 0.0)
    acts = sess.handle(st, 0.0)
    while acts:  # carry out allocation and spool opening
        nxt = []
        for a in acts:
            if type(a) is ds.Allocate:
                nxt += sess.handle(ds.Allocated(a.id, Assembly.replacing(a.start, a.base)), 0)
            elif type(a) is ds.OpenSpool:
                nxt += sess.handle(ds.SpoolOpened(a.id), 0.0)
        acts = nxt
    bm = random_bitmap(7)
    runs = [(1, 2), (10, 1), (4000, 96)]
    for f, c in runs:
        bm.meta.flags[f : f + c] = True
    p = Planner(bm, 0)
    p.spans = True
    (frame,) = p.take_runs(runs)
    out = sess.handle(frame, 0.0)
    writes = [a for a in out if type(a) is ds.WriteRange]
    assert [(w.offset, bytes(w.data)) for w in writes] == [
        (f * CHUNK, bytes(bm.serialize(f, c))) for f, c in runs]
    asm = sess.bitmaps[0].asm
    assert asm.digests.stale.count() == 0  # refreshed over the frame's extent


class _NoStore:
    def holds(self, node: str, name: str) -> bool:
        return False

    def replaceable(self, start: Start) -> None:
        return None


# -- compression by link rate -------------------------------------------------------------


def test_raw_payloads_are_deflated_only_on_a_slow_link() -> None:
    bm = DirtyBitmap(1 << 40, GRAN, CHUNK)
    bm.fill_random(0.10, np.random.default_rng(8))  # mid density: RAW
    p = Planner(bm, 0)
    assert {f.enc for f in p.encode_run(0, 1024)} == {int(Encoding.RAW)}  # not measured
    p.link_rate = 4e6  # a 4 MB/s link
    (f,) = p.encode_run(0, 1024)
    assert f.enc == Encoding.RAW | Encoding.ZLIB and len(f.data) < 0.55 * 1024 * CHUNK
    got = np.frombuffer(encodings.decode(f.enc, f.data, 1024 * CHUNK), dtype="<u8")
    assert np.array_equal(got, bm.chunk_words_view(0, 1024))
    p.link_rate = defaults.DEFLATE_BELOW * 2  # a fast link: compressing would slow it
    assert {f.enc for f in p.encode_run(0, 1024)} == {int(Encoding.RAW)}


def test_incompressible_raw_stays_raw_on_a_slow_link() -> None:
    bm = DirtyBitmap(1 << 40, GRAN, CHUNK)
    bm.fill_random(0.5, np.random.default_rng(9))
    p = Planner(bm, 0)
    p.link_rate = 4e6
    assert {f.enc for f in p.encode_run(0, 64)} == {int(Encoding.RAW)}


def test_trace_records_count_the_chunks_of_spans_frames(capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    """A trace (or a decoded capture) counts a spans frame's chunks, and `trace show`
    prints its run list as numbers."""
    import argparse

    from bitmig.daemon.trace_writer import frame_record
    from bitmig.tools.trace_cli import cmd_show
    from bitmig.tools.trace_records import summarize

    ev = Spans(0, encode_runs(np.array([2, 9]), np.array([1, 3])), int(Encoding.POSITIONS),
               b"")
    rec = {"mono": 0.0, "wall": 0.0, "side": "source",
           **frame_record("send", "d:1", ev, len(encode_bytes(ev)))}
    assert (rec["runs"], rec["chunks"]) == (2, 4)
    assert summarize([rec])["chunks_sent"] == 4
    cmd_show(argparse.Namespace(since=None, until=None, kind=None, bitmap=None), [rec])
    assert "runs=2 chunks=4" in capsys.readouterr().out
