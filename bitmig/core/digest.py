"""The tree digest that a complete frame carries, kept up to date incrementally.

tree digest = BLAKE3( BLAKE3(block 0) || BLAKE3(block 1) || ... ), 32-byte outputs, where
the blocks are consecutive DIGEST_BLOCK-byte pieces of the serialized bitmap (the last may
be shorter). Unlike a flat hash it can be refreshed by rehashing only the blocks that
changed, so neither side has to hash the whole bitmap inside the frozen window. BLAKE3
is a cryptographic hash about seven times faster than SHA-256 here (5.5 vs 0.75 GB/s on
16 KiB blocks), which matters because both sides hash every byte once per migration.
"""

from __future__ import annotations

import numpy as np
from blake3 import blake3

from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol import spec

BLOCK_WORDS = spec.DIGEST_BLOCK // 8


def tree_digest(data: bytes | memoryview) -> bytes:
    """The tree digest of serialized bitmap bytes, computed from scratch."""
    mv = memoryview(data).cast("B")
    leaves = b"".join(
        blake3(mv[i : i + spec.DIGEST_BLOCK]).digest()
        for i in range(0, max(len(mv), 1), spec.DIGEST_BLOCK)
    )
    return blake3(leaves).digest()


class DigestCache:
    """Leaf hashes of one bitmap, rehashed only where the bitmap changed since."""

    def __init__(self, bitmap: DirtyBitmap) -> None:
        self.bitmap = bitmap
        self.stale = bitmap.add_tracker(BLOCK_WORDS)
        self.leaves = np.zeros((self.stale.flags.size, spec.DIGEST_BYTES), dtype=np.uint8)

    def refresh(self, first_word: int = 0, end_word: int | None = None) -> int:
        """Rehash stale blocks (of the words [first_word, end_word) only, if given). Safe in
        a worker thread: a block changed while it is hashed is flagged again and rehashed
        next time. Returns blocks hashed."""
        if end_word is None:
            todo = self.stale.dirty()
        else:
            lo = first_word // BLOCK_WORDS
            todo = np.flatnonzero(self.stale.flags[lo : -(-end_word // BLOCK_WORDS)]) + lo
        if todo.size == 0:
            return 0
        # Runs of consecutive stale blocks, each hashed in one comprehension and stored
        # with one array assignment: per-block numpy calls cost 2-3 x the hashing itself.
        last = np.flatnonzero(np.diff(todo) != 1)  # the last block of each run but one
        starts = [int(todo[0]), *(todo[last + 1]).tolist()]
        ends = [*(todo[last] + 1).tolist(), int(todo[-1]) + 1]
        data = memoryview(self.bitmap.words).cast("B")
        block = spec.DIGEST_BLOCK
        for a, b in zip(starts, ends, strict=True):
            self.stale.flags[a:b] = False  # before reading: a concurrent change re-flags
            leaves = b"".join([blake3(data[o : o + block]).digest()
                               for o in range(a * block, min(b * block, data.nbytes), block)])
            self.leaves[a:b] = np.frombuffer(leaves, dtype=np.uint8).reshape(b - a, -1)
        return int(todo.size)

    def digest(self) -> bytes:
        self.refresh()
        return blake3(self.leaves.data).digest()
