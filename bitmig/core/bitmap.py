"""A dirty bitmap backed by numpy, with meta bitmaps that record which chunks changed.

The in-memory form is the serialized form: little-endian 64-bit words, bit i of the
bitmap is bit (i mod 64) of word i // 64, the last word zero-padded. Its sha256 is
therefore QEMU's `x-debug-block-dirty-bitmap-sha256`, and serializing a chunk is a
memoryview, not a copy. This module knows nothing of the network.
"""

from __future__ import annotations

import hashlib
import mmap
from typing import Any

import numpy as np

from bitmig.core import defaults
from bitmig.protocol.geometry import (  # re-exported: callers know them from here
    GeometryError,
    bit_count,
    check_geometry,
    chunk_bytes,
    chunk_count,
    serialized_size,
)
from bitmig.protocol.runs import spread

Buffer = Any  # bytes, bytearray, memoryview or ndarray (collections.abc.Buffer is 3.12+)

WORD = np.dtype("<u8")
ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class RangeError(ValueError):
    """A byte or chunk range that lies outside the bitmap."""


HUGE = 2 << 20  # arrays from this size on get their own populated mapping
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def alloc_words(nwords: int) -> np.ndarray:
    """Zeroed little-endian words. Large arrays come from an anonymous mapping populated
    at once (MADV_POPULATE_WRITE, one call), so the stream never stops on page faults and
    copies into the array run at memory speed. Measured here for 1 GiB: populating takes
    0.3-0.4 s; faulting in during a stream cost 0.5-1.5 s. MADV_HUGEPAGE was faster when
    free huge pages existed (0.05 s) but took 1.5-2.4 s when the kernel had to compact
    memory first, so it is not requested: predictable beats sometimes fast."""
    if nwords * 8 < HUGE:
        return np.zeros(nwords, dtype=WORD)
    m = mmap.mmap(-1, nwords * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass  # an older kernel: pages fault in on first touch instead
    return np.frombuffer(m, dtype=WORD)  # the array keeps the mapping alive


class ChangeTracker:
    """One flag per unit of `unit_words` words, set when a bit inside the unit changes.

    The meta bitmap is a ChangeTracker with unit = chunk size; the digest cache keeps
    another one per digest block. Flags are a numpy bool array: one byte per unit
    costs 1 MiB for a 1 GiB bitmap and makes bulk marking a single fancy-index store.
    """

    def __init__(self, nwords: int, unit_words: int, initial: bool = False) -> None:
        self.shift = unit_words.bit_length() - 1
        self.flags = np.full(-(-nwords // unit_words), initial, dtype=bool)

    def mark_words(self, word_indices: np.ndarray) -> None:
        self.flags[word_indices >> self.shift] = True

    def mark_mask(self, changed: np.ndarray) -> None:
        """Flag the units holding a True in `changed` (one bool per word): the dense
        form of mark_words, one pass with no index array."""
        unit = 1 << self.shift
        n = changed.size
        whole = n - n % unit
        if whole:
            self.flags[: whole // unit] |= changed[:whole].reshape(-1, unit).any(axis=1)
        if whole < n:
            self.flags[whole // unit] |= bool(changed[whole:].any())

    def mark_word(self, i: int) -> None:
        self.flags[i >> self.shift] = True

    def dirty(self) -> np.ndarray:
        """Indices of flagged units, ascending."""
        return np.flatnonzero(self.flags)

    def count(self) -> int:
        return int(np.count_nonzero(self.flags))


class DirtyBitmap:
    """One bit per `granularity` bytes of a disk of `disk_size` bytes."""

    def __init__(
        self,
        disk_size: int,
        granularity: int = defaults.GRANULARITY,
        chunk_size: int = defaults.CHUNK_SIZE,
        words: np.ndarray | None = None,
    ) -> None:
        check_geometry(disk_size, granularity, chunk_size)
        self.disk_size = disk_size
        self.granularity = granularity
        self.chunk_size = chunk_size
        self.nbits = bit_count(disk_size, granularity)
        self.nwords = serialized_size(disk_size, granularity) // 8
        self.chunk_words = chunk_size // 8
        self.nchunks = chunk_count(self.nwords * 8, chunk_size)  # read per frame: computed once
        fresh = words is None
        if fresh:
            words = alloc_words(self.nwords)
        elif words.dtype != WORD or words.shape != (self.nwords,):
            raise GeometryError(f"words must be {self.nwords} little-endian uint64")
        self.words = words
        self._tail_mask = np.uint64((1 << (self.nbits % 64)) - 1) if self.nbits % 64 else ALL_ONES
        self._count = 0 if fresh else int(np.bitwise_count(words).sum())
        self.meta = ChangeTracker(self.nwords, self.chunk_words)
        self._trackers: list[ChangeTracker] = [self.meta]

    # -- geometry ---------------------------------------------------------------------

    @property
    def serialized_size(self) -> int:
        return self.nwords * 8

    def chunk_bytes(self, first: int, count: int) -> int:
        """Serialized bytes of chunks [first, first + count) (the last chunk may be short)."""
        self._check_chunks(first, count)
        return chunk_bytes(self.serialized_size, self.chunk_size, first, count)

    def add_tracker(self, unit_words: int) -> ChangeTracker:
        """A new change tracker, all flags set (everything is new to its user)."""
        tracker = ChangeTracker(self.nwords, unit_words, initial=True)
        self._trackers.append(tracker)
        return tracker

    def remove_tracker(self, tracker: ChangeTracker) -> None:
        """Stop feeding a tracker (each one costs a store per mutation)."""
        if tracker in self._trackers and tracker is not self.meta:
            self._trackers.remove(tracker)

    # -- mutation ---------------------------------------------------------------------

    def _bit_range(self, offset: int, length: int, *, inner: bool) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise RangeError(
                f"range [{offset}, {offset + length}) lies outside the disk of "
                f"{self.disk_size} bytes"
            )
        g = self.granularity
        if inner:  # clusters wholly inside the range (none when it is inside one cluster)
            a = -(-offset // g)
            return a, max(a, (offset + length) // g)
        return offset // g, -(-(offset + length) // g)  # clusters the range touches

    def set(self, offset: int, length: int) -> int:
        """Mark every cluster that [offset, offset+length) touches. Returns bits changed."""
        a, b = self._bit_range(offset, length, inner=False)
        return self.set_bits(a, b)

    def reset(self, offset: int, length: int) -> int:
        """Clear the clusters that [offset, offset+length) covers wholly.

        A partly covered cluster stays dirty: clearing it would hide a write that the
        range does not account for. Returns bits changed.
        """
        a, b = self._bit_range(offset, length, inner=True)
        return self.reset_bits(a, b)

    def set_bits(self, a: int, b: int) -> int:
        return self._apply(a, b, True)

    def reset_bits(self, a: int, b: int) -> int:
        return self._apply(a, b, False)

    def clear(self) -> int:
        return self._apply(0, self.nbits, False)

    def _apply(self, a: int, b: int, value: bool) -> int:
        if not 0 <= a <= b <= self.nbits:
            raise RangeError(f"bit range [{a}, {b}) outside [0, {self.nbits})")
        if a == b:
            return 0
        wa, wb = a >> 6, (b - 1) >> 6
        head = (ALL_ONES << np.uint64(a & 63)) & ALL_ONES
        tail = ALL_ONES >> np.uint64(63 - ((b - 1) & 63))
        if wa == wb:  # the common case (one write, one cluster): scalar, no arrays
            mask = head & tail
            old = self.words[wa]
            new = (old | mask) if value else (old & ~mask)
            if new == old:
                return 0
            self.words[wa] = new
            changed = int(np.bitwise_count(old ^ new))
            self._count += changed if value else -changed
            for t in self._trackers:
                t.mark_word(wa)
            return changed
        seg = self.words[wa : wb + 1]
        old = seg.copy()
        if value:
            seg[0] |= head
            seg[1:-1] = ALL_ONES
            seg[-1] |= tail
        else:
            seg[0] &= ~head
            seg[1:-1] = 0
            seg[-1] &= ~tail
        diff = old ^ seg
        changed = int(np.bitwise_count(diff).sum())
        if changed:
            self._count += changed if value else -changed
            idx = np.flatnonzero(diff) + wa
            for t in self._trackers:
                t.mark_words(idx)
        return changed

    def set_many(self, bits: np.ndarray) -> int:
        """Set many single bits at once (a batch of cluster writes). Returns bits changed."""
        return self._apply_many(bits, True)

    def reset_many(self, bits: np.ndarray) -> int:
        return self._apply_many(bits, False)

    def _apply_many(self, bits: np.ndarray, value: bool) -> int:
        bits = np.asarray(bits, dtype=np.int64)
        if bits.size == 0:
            return 0
        if bits.min() < 0 or bits.max() >= self.nbits:
            raise RangeError(f"bit index outside [0, {self.nbits})")
        bits = np.unique(bits)  # duplicates would count twice below
        widx = bits >> 6
        masks = np.left_shift(np.uint64(1), (bits & 63).astype(np.uint64))
        hit = (self.words[widx] & masks) != 0
        todo = ~hit if value else hit
        if not todo.any():
            return 0
        widx, masks = widx[todo], masks[todo]
        if value:
            np.bitwise_or.at(self.words, widx, masks)
        else:
            np.bitwise_and.at(self.words, widx, ~masks)
        changed = int(widx.size)
        self._count += changed if value else -changed
        for t in self._trackers:
            t.mark_words(widx)
        return changed

    def merge_words(self, words: np.ndarray) -> int:
        """OR a whole bitmap of the same geometry into this one (a delta read from QEMU).

        One bulk pass: words that gain bits are stored, and every tracker (the meta
        bitmap among them) flags the chunks they lie in, so the next pass resends only
        those. Bits set past the end of the disk are refused. Returns bits changed.
        """
        src = np.asarray(words)
        if src.dtype != WORD or src.shape != (self.nwords,):
            raise GeometryError(f"words must be {self.nwords} little-endian uint64")
        if int(src[-1]) & ~int(self._tail_mask):
            raise ValueError("bits set past the end of the disk")
        # Deltas are mostly sparse: find their non-zero words in one scan, then work on
        # those only (an empty delta of a 32 MiB bitmap: ~1 ms instead of ~55 ms). A
        # dense one is done with whole-array operations (0.1 s instead of 0.6 s).
        idx = np.flatnonzero(src)
        if idx.size * 8 > self.nwords:
            gain_all = src & ~self.words
            changed_words = gain_all != 0
            self.words |= gain_all
            changed = int(np.bitwise_count(gain_all).sum())
            self._count += changed
            if changed:
                for t in self._trackers:
                    t.mark_mask(changed_words)
            return changed
        gain = src[idx] & ~self.words[idx]  # bits new to this bitmap
        keep = np.flatnonzero(gain)
        if keep.size == 0:
            return 0
        idx, gain = idx[keep], gain[keep]
        self.words[idx] |= gain
        changed = int(np.bitwise_count(gain).sum())
        self._count += changed
        for t in self._trackers:
            t.mark_words(idx)
        return changed

    def assign_words(self, words: np.ndarray) -> int:
        """Make this bitmap equal to `words` (a fresh full read from QEMU), in place:
        every tracker flags the chunks whose words differ, bits may be set or cleared.
        Returns the number of words that changed."""
        src = np.asarray(words)
        if src.dtype != WORD or src.shape != (self.nwords,):
            raise GeometryError(f"words must be {self.nwords} little-endian uint64")
        if int(src[-1]) & ~int(self._tail_mask):
            raise ValueError("bits set past the end of the disk")
        changed = src != self.words
        n = int(np.count_nonzero(changed))
        if n:
            self.words[:] = src
            self._count = int(np.bitwise_count(self.words).sum())
            for t in self._trackers:
                t.mark_mask(changed)
        return n

    def fill_random(self, fraction: float, rng: np.random.Generator) -> int:
        """Set each bit with probability `fraction` (to make test and demo bitmaps).

        Works block by block on 16-bit random numbers, so a 2 GiB bitmap needs neither a
        list of billions of indices nor a float per bit. Meta bits are not touched: this
        makes a starting state, not a stream of writes. Returns the set-bit count.
        """
        if not 0 <= fraction <= 1:
            raise ValueError(f"fill fraction must be in [0, 1], got {fraction}")
        threshold = round(fraction * 65536)
        block = 1 << 26  # bits per step
        out = self.words.view(np.uint8)
        for lo in range(0, self.nwords * 64, block):
            n = min(block, self.nwords * 64 - lo)
            if fraction == 0.5:
                r = rng.integers(0, 256, n // 8, dtype=np.uint8)
            else:
                r = np.packbits(rng.integers(0, 65536, n, dtype=np.uint16) < threshold,
                                bitorder="little")
            out[lo // 8 : (lo + n) // 8] = r
        self.words[-1] &= self._tail_mask
        self._count = int(np.bitwise_count(self.words).sum())
        return self._count

    # -- queries ------------------------------------------------------------------------

    def count(self) -> int:
        """Number of set bits (kept up to date by every mutation)."""
        return self._count

    def get(self, bit: int) -> bool:
        return bool((int(self.words[bit >> 6]) >> (bit & 63)) & 1)

    def sha256(self) -> bytes:
        """QEMU's x-debug-block-dirty-bitmap-sha256 of this bitmap."""
        return hashlib.sha256(self.words.data).digest()

    # -- serialization ------------------------------------------------------------------

    def _check_chunks(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.nchunks:
            raise RangeError(
                f"chunks [{first}, {first + count}) outside [0, {self.nchunks})"
            )

    def chunk_words_view(self, first: int, count: int) -> np.ndarray:
        """The words of chunks [first, first + count): a view, not a copy."""
        self._check_chunks(first, count)
        return self.words[first * self.chunk_words : (first + count) * self.chunk_words]

    def serialize(self, first: int, count: int) -> memoryview:
        """Serialized bytes of chunks [first, first + count), as a view into the bitmap."""
        return memoryview(self.chunk_words_view(first, count)).cast("B")

    def _store(self, first: int, count: int, new: np.ndarray | int, fresh: bool = False) -> None:
        seg = self.chunk_words_view(first, count)
        # `fresh`: the caller knows these chunks are still all zero (never written).
        before = 0 if fresh else int(np.bitwise_count(seg).sum())
        seg[:] = new
        self._stored(first, count, seg, before)

    def _stored(self, first: int, count: int, seg: np.ndarray, before: int) -> None:
        """Chunks [first, first + count) (their words: `seg`) were overwritten; they held
        `before` set bits: keep the tail clear, the count and the trackers right."""
        if first + count == self.nchunks:
            seg[-1] &= self._tail_mask  # padding bits past the last cluster stay zero
        self._count += int(np.bitwise_count(seg).sum()) - before
        lo = first * self.chunk_words
        for t in self._trackers:
            if t is not self.meta:
                t.flags[lo >> t.shift : ((lo + seg.size - 1) >> t.shift) + 1] = True

    def begin_overwrite(self, first: int, count: int, fresh: bool = False) -> int:
        """Chunks [first, first + count) are about to be overwritten in place (bytes
        received straight into serialize()'s view); returns what end_overwrite needs."""
        self._check_chunks(first, count)
        return 0 if fresh else int(np.bitwise_count(self.chunk_words_view(first, count)).sum())

    def end_overwrite(self, first: int, count: int, before: int, check: bool = True) -> None:
        """The in-place overwrite begun with begin_overwrite is done: keep the count and
        the trackers right, as deserialize would. Bits past the end of the disk raise
        ValueError (then cleared) unless `check` is False (then just cleared)."""
        seg = self.chunk_words_view(first, count)
        bad = first + count == self.nchunks and int(seg[-1]) & ~int(self._tail_mask)
        self._stored(first, count, seg, before)
        if bad and check:
            raise ValueError("bits set past the end of the disk")

    def deserialize(self, first: int, count: int, data: Buffer, fresh: bool = False) -> None:
        """Overwrite chunks [first, first + count) with serialized bytes."""
        expect = self.chunk_bytes(first, count)
        src = np.frombuffer(data, dtype=WORD)
        if src.nbytes != expect:
            raise ValueError(f"expected {expect} bytes for chunks [{first}, {first + count}), "
                             f"got {src.nbytes}")
        if first + count == self.nchunks and int(src[-1]) & ~int(self._tail_mask):
            raise ValueError("bits set past the end of the disk")
        self._store(first, count, src, fresh)

    # -- many runs at once (spans frames) ---------------------------------------------

    def run_word_indices(self, firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Indices of the words of chunk runs (ascending, disjoint, inside the bitmap)."""
        if firsts.size == 0:
            return np.zeros(0, dtype=np.int64)
        end = int(firsts[-1] + counts[-1])
        if int(firsts[0]) < 0 or end > self.nchunks:
            raise RangeError(f"runs [{int(firsts[0])}, {end}) outside [0, {self.nchunks})")
        starts = firsts * self.chunk_words
        lens = np.minimum((firsts + counts) * self.chunk_words, self.nwords) - starts
        return spread(starts, lens)

    def gather_runs(self, firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The words of chunk runs, concatenated (a copy: the runs are scattered)."""
        return self.words[self.run_word_indices(firsts, counts)]

    def deserialize_runs(self, firsts: np.ndarray, counts: np.ndarray, data: Buffer) -> None:
        """Overwrite chunk runs with their concatenated serialized bytes, in one pass."""
        idx = self.run_word_indices(firsts, counts)
        src = np.frombuffer(data, dtype=WORD)
        if src.size != idx.size:
            raise ValueError(f"expected {idx.size * 8} bytes for {firsts.size} runs, "
                             f"got {src.nbytes}")
        if idx.size and int(idx[-1]) == self.nwords - 1 and \
                int(src[-1]) & ~int(self._tail_mask):
            raise ValueError("bits set past the end of the disk")
        before = int(np.bitwise_count(self.words[idx]).sum())
        self.words[idx] = src
        self._count += int(np.bitwise_count(src).sum()) - before
        for t in self._trackers:
            if t is not self.meta:
                t.mark_words(idx)

    def deserialize_zeroes(self, first: int, count: int) -> None:
        self._store(first, count, 0)

    def deserialize_ones(self, first: int, count: int) -> None:
        self._store(first, count, ALL_ONES)
