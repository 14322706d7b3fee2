"""Resuming a bitmap after a dropped connection: the destination's `have` mask.

The destination answers a start that carries the token of a bitmap it holds partly with
the mask of chunks it already has (one bit per chunk, packed like the bitmap itself and
encoded with the bits-frame encodings). The source then sends the chunks the mask lacks
plus those its meta bitmap says changed since: nothing twice that need not be.
"""

from __future__ import annotations

import numpy as np

from bitmig.protocol import encodings, spec
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.spec import ErrorCode


def _mask_bytes(nchunks: int) -> int:
    return -(-nchunks // 64) * 8


def encode_have(received: np.ndarray) -> tuple[int, bytes] | None:
    """(enc, data) for a Ready frame, or None when the mask is too large for one frame."""
    if _mask_bytes(received.size) > spec.MAX_FRAME_PAYLOAD:
        return None
    packed = np.zeros(_mask_bytes(received.size), dtype=np.uint8)
    packed[: -(-received.size // 8)] = np.packbits(received, bitorder="little")
    enc, data = encodings.encode(packed.view("<u8"))
    return int(enc), bytes(data)


def decode_have(enc: int, data: bytes, nchunks: int, bitmap_id: int) -> np.ndarray:
    """The chunks the destination holds, one bool per chunk. Raises bad_payload."""
    raw = _mask_bytes(nchunks)
    try:
        words = np.frombuffer(encodings.decode(enc, data, raw), dtype=np.uint8)
    except RemoteProtocolError as e:
        raise RemoteProtocolError(ErrorCode.BAD_PAYLOAD, f"ready.have: {e.message}",
                                  bitmap_id) from None
    bools = np.unpackbits(words, bitorder="little").astype(bool)
    if bools[nchunks:].any():
        raise RemoteProtocolError(ErrorCode.BAD_PAYLOAD,
                                  f"ready.have marks chunks beyond the {nchunks} chunks",
                                  bitmap_id)
    return bools[:nchunks]
