"""Which frames carry which chunks: the bulk pass, dirty passes and whole sends.

Pure code over a DirtyBitmap. Each `take_*` call is synchronous and does three things
at one instant: reads the chunks, clears their meta bits, and returns the frames. A
mutation between two calls therefore either lands in frames already returned (and its
meta bit is clear) or sets the meta bit again for the next pass: nothing is missed. The
caller must write returned frames before it yields to mutations, because raw payloads
are views into the bitmap.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol import encodings, spec
from bitmig.protocol.events import Bits, Spans, Zeroes
from bitmig.protocol.runs import encode_runs, spread
from bitmig.protocol.spec import Encoding

Frame = Bits | Zeroes | Spans


def runs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of True in a bool array."""
    m = np.concatenate(([False], mask, [False])).view(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    return starts, np.flatnonzero(d == -1) - starts


def split_runs(indices: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Group ascending chunk indices into (first, count) runs of consecutive chunks."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    firsts = indices[np.concatenate(([0], breaks))]
    ends = indices[np.concatenate((breaks - 1, [indices.size - 1]))] + 1
    out: list[tuple[int, int]] = []
    for a, b in zip(firsts.tolist(), ends.tolist(), strict=True):
        out.extend((s, min(max_len, b - s)) for s in range(a, b, max_len))
    return out


class Planner:
    """Cuts one bitmap's chunks into bits and zeroes frames for bitmap id `bitmap_id`."""

    def __init__(
        self,
        bitmap: DirtyBitmap,
        bitmap_id: int,
        frame_payload: int = defaults.FRAME_PAYLOAD,
    ) -> None:
        self.bitmap = bitmap
        self.id = bitmap_id
        self.max_chunks = max(1, frame_payload // bitmap.chunk_size)
        self.frame_payload = max(frame_payload, bitmap.chunk_size)
        # Set by the session: the peer accepts spans frames (it announced spec.CAP_SPANS),
        # and the link's measured rate in bytes/s (0: not measured yet).
        self.spans = False
        self.link_rate = 0.0

    def raw_keep_below(self) -> float:
        """Deflate RAW payloads (keeping the result below this fraction of raw) only on a
        slow link: compressing pays when sending n raw bytes takes longer than compressing
        them and sending the m left, i.e. m < n x (1 - link / deflate rate)."""
        rate = self.link_rate
        if not 0 < rate <= defaults.DEFLATE_BELOW:
            return 0.0
        return 1.0 - rate / defaults.DEFLATE_RATE

    def _encode(self, words: np.ndarray) -> tuple[int, bytes | memoryview]:
        return encodings.encode(words, self.raw_keep_below())

    # -- one run of chunks -> frames --------------------------------------------------

    def encode_run(self, first: int, count: int) -> list[Frame]:
        """Frames for chunks [first, first+count): zero runs apart, the rest encoded."""
        bm = self.bitmap
        words = bm.chunk_words_view(first, count)
        if not words.any():
            return [Zeroes(self.id, first, count)]
        enc, data = self._encode(words)
        if enc != Encoding.RAW or count == 1:
            return [Bits(self.id, first, count, enc, data)]
        # Raw pays a kilobyte per zero chunk: send zero stretches as zeroes frames instead.
        nz = self._nonzero(first, count)
        if nz.all():
            return [Bits(self.id, first, count, enc, data)]
        frames: list[Frame] = []
        starts, lens = runs_of(~nz)
        pos = 0
        for s, n in zip(starts.tolist(), lens.tolist(), strict=True):
            if s > pos:
                frames.append(self._bits(first + pos, s - pos))
            frames.append(Zeroes(self.id, first + s, n))
            pos = s + n
        if pos < count:
            frames.append(self._bits(first + pos, count - pos))
        return frames

    def _bits(self, first: int, count: int) -> Bits:
        enc, data = self._encode(self.bitmap.chunk_words_view(first, count))
        return Bits(self.id, first, count, enc, data)

    def _nonzero(self, first: int, count: int) -> np.ndarray:
        bm = self.bitmap
        words = bm.chunk_words_view(first, count)
        full = words.size // bm.chunk_words
        nz = np.empty(count, dtype=bool)
        nz[:full] = words[: full * bm.chunk_words].reshape(full, -1).any(axis=1)
        if full < count:
            nz[full] = words[full * bm.chunk_words :].any()
        return nz

    # -- passes -----------------------------------------------------------------------

    def bulk(self) -> Iterator[list[Frame]]:
        """The bulk pass: every chunk once, window by window.

        Each window (one frame's worth of chunks) is read and its meta bits cleared when
        the iterator is advanced. Windows of zeroes merge into one zeroes frame, held
        back until a non-zero window (or the end) shows where the zero run ends.
        """
        bm = self.bitmap
        zero_first: int | None = None
        for first in range(0, bm.nchunks, self.max_chunks):
            count = min(self.max_chunks, bm.nchunks - first)
            bm.meta.flags[first : first + count] = False
            frames = self.encode_run(first, count)
            if len(frames) == 1 and type(frames[0]) is Zeroes:
                zero_first = first if zero_first is None else zero_first
                continue
            if zero_first is not None:
                head = frames[0]
                if type(head) is Zeroes:  # the window starts with zeroes: one frame
                    frames[0] = Zeroes(self.id, zero_first, head.first + head.count - zero_first)
                else:
                    frames.insert(0, Zeroes(self.id, zero_first, first - zero_first))
                zero_first = None
            yield frames
        if zero_first is not None:
            yield [Zeroes(self.id, zero_first, bm.nchunks - zero_first)]

    def dirty_runs(self) -> list[tuple[int, int]]:
        """The chunks whose meta bit is set now, as runs; the plan of one dirty pass."""
        return split_runs(self.bitmap.meta.dirty(), self.max_chunks)

    def take(self, first: int, count: int) -> list[Frame]:
        """Frames for a run of a dirty pass; clears the run's meta bits."""
        self.bitmap.meta.flags[first : first + count] = False
        return self.encode_run(first, count)

    def take_runs(self, runs: list[tuple[int, int]]) -> list[Frame]:
        """Frames for runs (ascending, each at most one frame's worth) of a dirty pass or
        the completion; clears their meta bits. With a peer that accepts spans frames,
        scattered runs travel together: each group of runs up to the frame payload and
        MAX_SPAN_RUNS becomes one spans frame (a group of one run, one bits frame)."""
        if not runs:
            return []
        if not self.spans:
            return [f for first, count in runs for f in self.take(first, count)]
        arr = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        firsts, counts = arr[:, 0], arr[:, 1]
        ends = np.cumsum(counts * self.bitmap.chunk_size)  # raw bytes up to each run's end
        frames: list[Frame] = []
        a = 0
        while a < firsts.size:  # one iteration per frame, not per run
            base = int(ends[a - 1]) if a else 0
            b = int(np.searchsorted(ends, base + self.frame_payload, side="right"))
            b = min(max(b, a + 1), a + spec.MAX_SPAN_RUNS)
            frames.extend(self._take_group(firsts[a:b], counts[a:b]))
            a = b
        return frames

    def _take_group(self, firsts: np.ndarray, counts: np.ndarray) -> list[Frame]:
        if firsts.size == 1:
            return self.take(int(firsts[0]), int(counts[0]))
        bm = self.bitmap
        bm.meta.flags[spread(firsts, counts)] = False
        enc, data = self._encode(bm.gather_runs(firsts, counts))
        return [Spans(self.id, encode_runs(firsts, counts), enc, data)]

    def take_dirty(self) -> list[Frame]:
        """Every dirty chunk now (completion, when mutations are held)."""
        return self.take_runs(self.dirty_runs())

    def take_all(self) -> list[Frame]:
        """The whole bitmap at once (small bitmaps, sent at completion)."""
        frames: list[Frame] = []
        for window in self.bulk():
            frames.extend(window)
        return frames

    def pending_bytes(self) -> int:
        """Serialized bytes still to send: what the convergence test weighs (bytes, not
        bits: counting bits is the QEMU bug that never converges)."""
        return self.bitmap.meta.count() * self.bitmap.chunk_size
