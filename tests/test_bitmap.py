"""The bitmap against a plain reference model; meta bits; serialization; digests."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmig.core.bitmap import DirtyBitmap, GeometryError, RangeError
from bitmig.core.digest import DigestCache, tree_digest


class Model:
    """One Python bool per cluster; the obvious semantics, no cleverness."""

    def __init__(self, disk: int, gran: int) -> None:
        self.disk, self.gran = disk, gran
        self.bits = [False] * (-(-disk // gran))

    def set(self, off: int, n: int) -> None:
        for b in range(off // self.gran, -(-(off + n) // self.gran)):
            self.bits[b] = True

    def reset(self, off: int, n: int) -> None:
        for b in range(-(-off // self.gran), (off + n) // self.gran):
            self.bits[b] = False

    def serialized(self) -> bytes:
        words = [0] * (-(-len(self.bits) // 64))
        for i, v in enumerate(self.bits):
            if v:
                words[i // 64] |= 1 << (i % 64)
        return b"".join(w.to_bytes(8, "little") for w in words)


GRAN = 512
ops = st.lists(
    st.tuples(st.sampled_from(["set", "reset", "set_many", "reset_many"]),
              st.integers(0, 200_000), st.integers(0, 60_000)),
    max_size=40)


@settings(max_examples=150, deadline=None)
@given(disk=st.integers(1, 200_000), chunk=st.sampled_from([8, 16, 64, 1024]), ops=ops)
def test_bitmap_matches_reference_model(disk: int, chunk: int, ops: list) -> None:
    bm = DirtyBitmap(disk, GRAN, chunk)
    model = Model(disk, GRAN)
    for op, a, n in ops:
        a %= disk
        n = min(n, disk - a)
        before = bm.words.copy()
        bm.meta.flags[:] = False
        if op == "set":
            bm.set(a, n)
            model.set(a, n)
        elif op == "reset":
            bm.reset(a, n)
            model.reset(a, n)
        else:
            idx = np.arange(a // GRAN, (a + n) // GRAN, 7)
            (bm.set_many if op == "set_many" else bm.reset_many)(idx)
            for i in idx.tolist():
                model.bits[i] = op == "set_many"
        # The meta bit of a chunk is set exactly when a bit inside it changed.
        changed = (before != bm.words)
        cw = chunk // 8
        expect = np.zeros(bm.nchunks, bool)
        expect[np.flatnonzero(changed) // cw] = True
        assert np.array_equal(bm.meta.flags, expect)
    assert bytes(bm.serialize(0, bm.nchunks)) == model.serialized()
    assert bm.count() == sum(model.bits)
    assert bm.sha256() == hashlib.sha256(model.serialized()).digest()


@settings(max_examples=60, deadline=None)
@given(disk=st.integers(1, 100_000), chunk=st.sampled_from([8, 64, 512]),
       seed=st.integers(0, 2**32 - 1))
def test_serialize_deserialize_round_trip(disk: int, chunk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = DirtyBitmap(disk, GRAN, chunk)
    src.set_many(rng.integers(0, src.nbits, rng.integers(0, src.nbits + 1)))
    dst = DirtyBitmap(disk, GRAN, chunk)
    first = int(rng.integers(0, src.nchunks))
    count = int(rng.integers(1, src.nchunks - first + 1))
    dst.deserialize_ones(0, dst.nchunks)
    dst.deserialize_zeroes(0, first)
    dst.deserialize(first, count, bytes(src.serialize(first, count)))
    if first + count < dst.nchunks:
        dst.deserialize(first + count, dst.nchunks - first - count,
                        src.serialize(first + count, dst.nchunks - first - count))
    if first:
        dst.deserialize(0, first, src.serialize(0, first))
    assert np.array_equal(dst.words, src.words)
    assert dst.count() == src.count()
    assert dst.sha256() == src.sha256()


def test_all_ones_keeps_padding_clear() -> None:
    bm = DirtyBitmap(100 * 512, 512, 8)  # 100 bits: the last word has 28 padding bits
    bm.deserialize_ones(0, bm.nchunks)
    assert bm.count() == 100
    assert int(bm.words[-1]) == (1 << 36) - 1


def test_deserialize_refuses_padding_bits() -> None:
    bm = DirtyBitmap(100 * 512, 512, 8)
    with pytest.raises(ValueError, match="past the end of the disk"):
        bm.deserialize(1, 1, (1 << 63).to_bytes(8, "little"))


def test_unaligned_set_and_reset_semantics() -> None:
    bm = DirtyBitmap(1 << 20, 65536)
    bm.set(65535, 2)  # touches clusters 0 and 1
    assert bm.count() == 2
    bm.reset(1, 65536 * 2)  # covers only cluster 1 wholly; cluster 0 stays dirty
    assert [bm.get(i) for i in range(3)] == [True, False, False]


@pytest.mark.parametrize(("off", "n"), [(-1, 1), (0, (1 << 20) + 1), ((1 << 20), 1)])
def test_range_outside_disk_is_a_clear_error(off: int, n: int) -> None:
    bm = DirtyBitmap(1 << 20, 65536)
    with pytest.raises(RangeError, match="outside the disk"):
        bm.set(off, n)


@pytest.mark.parametrize(("args", "msg"), [
    ((1 << 20, 1000, 1024), "granularity must be a power of two"),
    ((1 << 20, 256, 1024), "granularity must be a power of two >= 512"),
    ((1 << 20, 65536, 4), "chunk size"),
    ((0, 65536, 1024), "at least 1 byte"),
    ((1 << 62, 512, 1024), "exceeds the limit"),
])
def test_bad_geometry(args: tuple, msg: str) -> None:
    with pytest.raises(GeometryError, match=msg):
        DirtyBitmap(*args)


def test_digest_cache_tracks_every_change() -> None:
    rng = np.random.default_rng(3)
    bm = DirtyBitmap(1 << 36, 65536)  # 128 KiB bitmap, two digest blocks
    cache = DigestCache(bm)
    for _ in range(20):
        bm.set_many(rng.integers(0, bm.nbits, 50))
        bm.reset(int(rng.integers(0, 1 << 35)), 1 << 30)
        assert cache.digest() == tree_digest(bm.words.data)
    assert cache.refresh() == 0  # nothing stale after a digest


@settings(max_examples=100, deadline=None)
@given(disk=st.integers(1, 2_000_000), chunk=st.sampled_from([8, 16, 64, 1024]),
       seed=st.integers(0, 2**32 - 1), sparse=st.booleans())
def test_merge_words_is_or_and_marks_changed_chunks(disk: int, chunk: int, seed: int,
                                                    sparse: bool) -> None:
    """A delta folded in with merge_words: bits are the union (reference model: one bool
    per cluster), the count follows, and exactly the chunks that gained a bit are marked.
    Sparse deltas (a few bits) and dense ones take different paths."""
    rng = np.random.default_rng(seed)
    bm = DirtyBitmap(disk, GRAN, chunk)
    model = Model(disk, GRAN)
    for b in rng.integers(0, bm.nbits, rng.integers(0, bm.nbits + 1)).tolist():
        bm.set_bits(b, b + 1)
        model.bits[b] = True
    delta = DirtyBitmap(disk, GRAN, chunk)
    nnew = rng.integers(0, 3) if sparse else rng.integers(0, bm.nbits + 1)
    new = rng.integers(0, bm.nbits, nnew).tolist()
    for b in new:
        delta.set_bits(b, b + 1)
    bm.meta.flags[:] = False
    gained = {b for b in new if not model.bits[b]}
    for b in new:
        model.bits[b] = True
    assert bm.merge_words(delta.words) == len(gained)
    assert bytes(bm.serialize(0, bm.nchunks)) == model.serialized()
    assert bm.count() == sum(model.bits)
    expect = np.zeros(bm.nchunks, bool)
    for b in gained:
        expect[(b // 64) // (chunk // 8)] = True
    assert np.array_equal(bm.meta.flags, expect)


def test_merge_words_refuses_wrong_geometry_and_padding() -> None:
    bm = DirtyBitmap(100 * GRAN, GRAN, 64)
    with pytest.raises(GeometryError, match="words must be 2"):
        bm.merge_words(np.zeros(3, dtype="<u8"))
    bad = np.zeros(2, dtype="<u8")
    bad[1] = np.uint64(1 << 40)  # bit 104: past cluster 99
    with pytest.raises(ValueError, match="past the end"):
        bm.merge_words(bad)
    assert bm.count() == 0


@settings(max_examples=60, deadline=None)
@given(disk=st.integers(1, 200_000), chunk=st.sampled_from([8, 16, 64, 1024]),
       seed=st.integers(0, 2**32 - 1))
def test_assign_words_replaces_and_marks_every_tracker(disk: int, chunk: int, seed: int) -> None:
    """A full re-read assigned in place: bits equal the new words (set and cleared), the
    count follows, and the meta bitmap and other trackers flag exactly the chunks that
    differ."""
    rng = np.random.default_rng(seed)
    bm = DirtyBitmap(disk, GRAN, chunk)
    bm.set_many(rng.integers(0, bm.nbits, rng.integers(0, bm.nbits + 1)))
    other = DirtyBitmap(disk, GRAN, chunk)
    other.set_many(rng.integers(0, bm.nbits, rng.integers(0, bm.nbits + 1)))
    bm.meta.flags[:] = False
    extra = bm.add_tracker(2 * bm.chunk_words)
    extra.flags[:] = False
    expect_words = np.flatnonzero(bm.words != other.words)
    assert bm.assign_words(other.words) == expect_words.size
    assert np.array_equal(bm.words, other.words) and bm.count() == other.count()
    for t, unit in ((bm.meta, bm.chunk_words), (extra, 2 * bm.chunk_words)):
        expect = np.zeros(t.flags.size, bool)
        expect[expect_words // unit] = True
        assert np.array_equal(t.flags, expect)
