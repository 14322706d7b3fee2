"""The destination's side of one bitmap: frames in, a verified bitmap out. No I/O."""

from __future__ import annotations

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import DigestCache
from bitmig.protocol import encodings
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import Bits, Complete, Spans, Start, Zeroes
from bitmig.protocol.runs import decode_runs, raw_bytes, spread
from bitmig.protocol.spec import ErrorCode


class Assembly:
    """Rebuilds the bitmap a start frame announced from bits and zeroes frames."""

    def __init__(self, start: Start) -> None:
        self.start = start
        # The words come populated (bitmap.alloc_words): no page faults during the stream.
        self.bitmap = DirtyBitmap(start.disk_size, start.granularity, start.chunk_size)
        self.digests = DigestCache(self.bitmap)
        self.received = np.zeros(self.bitmap.nchunks, dtype=bool)

    @classmethod
    def replacing(cls, start: Start, base: DirtyBitmap | None) -> Assembly:
        """An assembly that starts from `base`'s words with every chunk received (the
        retry of a migration whose ack was lost), or a fresh one without a base."""
        asm = cls(start)
        if base is not None:
            asm.bitmap.deserialize(0, asm.bitmap.nchunks, base.words)
            asm.received[:] = True
        return asm

    def apply(self, frame: Bits | Zeroes | Spans) -> None:
        if type(frame) is Spans:
            self.apply_spans(frame)
            return
        bm = self.bitmap
        first, count = frame.first, frame.count
        if type(frame) is Zeroes:
            bm.deserialize_zeroes(first, count)
        else:
            raw = bm.chunk_bytes(first, count)
            try:
                words = encodings.decode(frame.enc, frame.data, raw)
                fresh = not self.received[first : first + count].any()
                bm.deserialize(first, count, words, fresh)
            except RemoteProtocolError as e:  # the encoding's own checks: name the bitmap
                raise RemoteProtocolError(e.code, e.message, frame.id) from None
            except ValueError as e:
                raise RemoteProtocolError(ErrorCode.BAD_PAYLOAD, str(e), frame.id) from None
        self.received[first : first + count] = True

    def apply_spans(self, frame: Spans) -> tuple[np.ndarray, np.ndarray]:
        """Decode a spans frame's payload once and store all its runs in one numpy pass
        (the connection checked the runs against the geometry). Returns the runs."""
        bm = self.bitmap
        firsts, counts = decode_runs(frame.runs)
        try:
            raw = raw_bytes(firsts, counts, bm.serialized_size, bm.chunk_size)
            words = encodings.decode(frame.enc, frame.data, raw)
            bm.deserialize_runs(firsts, counts, words)
        except RemoteProtocolError as e:
            raise RemoteProtocolError(e.code, e.message, frame.id) from None
        except ValueError as e:
            raise RemoteProtocolError(ErrorCode.BAD_PAYLOAD, str(e), frame.id) from None
        self.received[spread(firsts, counts)] = True
        return firsts, counts

    def missing(self) -> int:
        return int(self.received.size - np.count_nonzero(self.received))

    def verify(self, complete: Complete) -> bytes:
        """Check completeness, count and digest; return the digest. Raises per-bitmap errors."""
        bid = complete.id
        missing = self.missing()
        if missing:
            raise RemoteProtocolError(
                ErrorCode.INCOMPLETE, f"{missing} of {self.received.size} chunks never arrived",
                bid)
        count = self.bitmap.count()
        if count != complete.count:
            raise RemoteProtocolError(
                ErrorCode.COUNT_MISMATCH,
                f"rebuilt bitmap has {count} bits set, source says {complete.count}", bid)
        digest = self.digests.digest()
        if digest != complete.digest:
            raise RemoteProtocolError(
                ErrorCode.DIGEST_MISMATCH,
                f"rebuilt bitmap digest {digest.hex()[:16]}... differs from the source's "
                f"{complete.digest.hex()[:16]}...", bid)
        return digest
