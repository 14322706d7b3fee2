"""The tree digest that a complete frame carries, kept up to date incrementally.

tree digest = SHA-256( SHA-256(block 0) || SHA-256(block 1) || ... ), where the blocks
are consecutive DIGEST_BLOCK-byte pieces of the serialized bitmap (the last may be
shorter). Unlike a flat SHA-256 it can be refreshed by rehashing only the blocks that
changed, so neither side has to hash the whole bitmap inside the frozen window.
"""

from __future__ import annotations

import hashlib

import numpy as np

from bitmig.bitmap import DirtyBitmap
from bitmig.protocol import spec

BLOCK_WORDS = spec.DIGEST_BLOCK // 8


def tree_digest(data: bytes | memoryview) -> bytes:
    """The tree digest of serialized bitmap bytes, computed from scratch."""
    mv = memoryview(data).cast("B")
    leaves = b"".join(
        hashlib.sha256(mv[i : i + spec.DIGEST_BLOCK]).digest()
        for i in range(0, max(len(mv), 1), spec.DIGEST_BLOCK)
    )
    return hashlib.sha256(leaves).digest()


class DigestCache:
    """Leaf hashes of one bitmap, rehashed only where the bitmap changed since."""

    def __init__(self, bitmap: DirtyBitmap) -> None:
        self.bitmap = bitmap
        self.stale = bitmap.add_tracker(BLOCK_WORDS)
        self.leaves = np.zeros((self.stale.flags.size, spec.DIGEST_BYTES), dtype=np.uint8)

    def refresh(self) -> int:
        """Rehash stale blocks. Safe in a worker thread: a block changed while it is
        hashed is flagged again and rehashed next time. Returns blocks hashed."""
        words = self.bitmap.words
        todo = self.stale.dirty()
        for i in todo.tolist():
            self.stale.flags[i] = False  # before reading: a concurrent change re-flags it
            block = words[i * BLOCK_WORDS : (i + 1) * BLOCK_WORDS]
            self.leaves[i] = np.frombuffer(hashlib.sha256(block).digest(), dtype=np.uint8)
        return int(todo.size)

    def digest(self) -> bytes:
        self.refresh()
        return hashlib.sha256(self.leaves.data).digest()
