"""The destination's side of one bitmap: frames in, a verified bitmap out. No I/O."""

from __future__ import annotations

import numpy as np

from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import DigestCache
from bitmig.protocol import encodings
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.events import Bits, Complete, Spans, Start, Zeroes
from bitmig.protocol.runs import decode_runs, raw_bytes, spread
from bitmig.protocol.spec import Encoding, ErrorCode


class _Landed:
    """A raw payload being received straight into the bitmap's words (Assembly.landing)."""

    __slots__ = ("before", "count", "first", "view")

    def __init__(self, first: int, count: int, before: int, view: memoryview) -> None:
        self.first, self.count, self.before, self.view = first, count, before, view


class Assembly:
    """Rebuilds the bitmap a start frame announced from bits and zeroes frames."""

    def __init__(self, start: Start) -> None:
        self.start = start
        # The words come populated (bitmap.alloc_words): no page faults during the stream.
        self.bitmap = DirtyBitmap(start.disk_size, start.granularity, start.chunk_size)
        self.digests = DigestCache(self.bitmap)
        self.received = np.zeros(self.bitmap.nchunks, dtype=bool)
        self._landed: _Landed | None = None

    @classmethod
    def replacing(cls, start: Start, base: DirtyBitmap | None) -> Assembly:
        """An assembly that starts from `base`'s words with every chunk received (the
        retry of a migration whose ack was lost), or a fresh one without a base."""
        asm = cls(start)
        if base is not None:
            asm.bitmap.deserialize(0, asm.bitmap.nchunks, base.words)
            asm.received[:] = True
        return asm

    def landing(self, frame: Bits) -> memoryview | None:
        """Where the raw payload of `frame` (checked, still arriving) should be received:
        the bitmap's own words for those chunks, so the bytes are copied once, from the
        kernel. The frame must then come to apply() (which accounts for the bytes); a
        payload that never completes is settled by abandon(). None: any other encoding
        or size, or a landing already open (the payload goes to a buffer, as usual)."""
        if frame.enc != Encoding.RAW or self._landed is not None:
            return None
        bm = self.bitmap
        first, count = frame.first, frame.count
        if memoryview(frame.data).nbytes != bm.chunk_bytes(first, count):
            return None  # apply() reports the wrong length
        fresh = not self.received[first : first + count].any()
        before = bm.begin_overwrite(first, count, fresh)
        view = bm.serialize(first, count)
        self._landed = _Landed(first, count, before, view)
        return view

    def abandon(self) -> None:
        """The landed payload will never complete (the connection broke inside it): its
        chunks hold part old, part new bytes, so they are cleared and count as not
        received (a resume asks for them again)."""
        landed, self._landed = self._landed, None
        if landed is not None:
            bm, first, count = self.bitmap, landed.first, landed.count
            bm.end_overwrite(first, count, landed.before, check=False)
            bm.deserialize_zeroes(first, count)  # as if never received: "fresh" holds
            self.received[first : first + count] = False

    def apply(self, frame: Bits | Zeroes | Spans) -> None:
        bm = self.bitmap
        landed = self._landed
        if landed is not None:
            if type(frame) is Bits and frame.data is landed.view:
                self._landed = None
                first, count = landed.first, landed.count
                try:
                    bm.end_overwrite(first, count, landed.before)
                except ValueError as e:
                    raise RemoteProtocolError(ErrorCode.BAD_PAYLOAD, str(e), frame.id) from None
                self.received[first : first + count] = True
                return
            self.abandon()
        if type(frame) is Spans:
            self.apply_spans(frame)
            return
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
