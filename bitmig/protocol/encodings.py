"""Payload encodings of bits frames: raw words, set-bit positions, runs, zlib over any.

All work is vectorized with numpy. The encoder picks the smallest form per frame; a
frame whose density makes raw the obvious winner is sent as a view, never copied.
Decoders bound every size by the raw size of the declared chunks before allocating.
"""

from __future__ import annotations

import zlib

import numpy as np

from bitmig.protocol import spec
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.spec import Encoding, ErrorCode

MAX_VARINT_BYTES = spec.MAX_VARINT_BYTES  # 35 bits: far above the 2**25 bits of a frame
ZLIB_LEVEL = 6
ZLIB_MIN = 64  # payloads shorter than this are not worth a compression attempt
# Densities between these send raw without looking further: no sparse form can win.
RAW_LOW, RAW_HIGH = 1 / 16, 15 / 16

_U8 = np.uint8
_U64 = np.uint64
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def leb128_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value, concatenated (vectorized)."""
    v = np.asarray(values, dtype=_U64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += v >= _U64(1 << (7 * k))
    if (v >= _U64(1 << (7 * MAX_VARINT_BYTES))).any():
        raise ValueError("value too large for the varint form")
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=_U8)
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        byte = (v[sel] >> _U64(7 * k)) & _U64(0x7F)
        byte |= (nbytes[sel] > k + 1).astype(_U64) << _U64(7)
        out[starts[sel] + k] = byte
    return out.tobytes()


def leb128_decode(data: bytes | memoryview) -> np.ndarray:
    """Values of concatenated unsigned LEB128 numbers; raises bad_payload when malformed."""
    b = np.frombuffer(data, dtype=_U8)
    if b.size == 0:
        return np.zeros(0, dtype=_U64)
    if b[-1] & 0x80:
        raise _bad("payload ends inside a varint")
    ends = np.flatnonzero(b < 0x80)
    lens = np.diff(ends, prepend=-1)
    if lens.max() > MAX_VARINT_BYTES:
        raise _bad(f"varint longer than {MAX_VARINT_BYTES} bytes")
    starts = ends - lens + 1
    pos = np.arange(b.size) - np.repeat(starts, lens)
    vals = (b & 0x7F).astype(_U64) << (7 * pos).astype(_U64)
    return np.add.reduceat(vals, starts)


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_PAYLOAD, message)


def set_positions(words: np.ndarray) -> np.ndarray:
    """Ascending indices of the set bits of `words` (unpacks only the non-zero words)."""
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.flatnonzero(np.unpackbits(words[nz].view(_U8), bitorder="little"))
    return nz[idx >> 6] * 64 + (idx & 63)


def words_from_positions(pos: np.ndarray, nwords: int) -> np.ndarray:
    """Words with exactly the bits at `pos` (ascending, unique) set."""
    words = np.zeros(nwords, dtype="<u8")
    if pos.size:
        widx = pos >> 6
        masks = np.left_shift(_U64(1), (pos & 63).astype(_U64))
        starts = np.flatnonzero(np.diff(widx, prepend=-1))
        words[widx[starts]] = np.bitwise_or.reduceat(masks, starts)
    return words


def run_edges(words: np.ndarray) -> np.ndarray:
    """Words whose bit i is set where bit i differs from bit i-1 (bit -1 counts as 0)."""
    carry = np.empty_like(words)
    carry[0] = 0
    carry[1:] = words[:-1] >> _U64(63)
    return words ^ ((words << _U64(1)) | carry)


def prefix_xor(edges: np.ndarray) -> np.ndarray:
    """Inverse of run_edges: bit i is the parity of the edges at or below i."""
    x = edges.copy()
    for s in (1, 2, 4, 8, 16, 32):
        x ^= x << _U64(s)
    # Parity carried into each word from all words before it.
    odd = np.cumsum(x >> _U64(63), dtype=np.int64) & 1
    x[1:] ^= np.where(odd[:-1] == 1, _U64(0xFFFF_FFFF_FFFF_FFFF), _U64(0))
    return x


SAMPLE_PIECES, SAMPLE_PIECE = 4, 4096  # what squeeze_raw deflates first, from a big payload


def _deflate(data: bytes | memoryview) -> bytes:
    # Huffman coding only: random bits hold no repeats worth searching for; ~100 MB/s
    # here (2-3x zlib level 1) for smaller output (0.48 x raw at 10 % density vs 0.58 x).
    co = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return co.compress(data) + co.flush()


def squeeze_raw(raw: memoryview, keep_below: float) -> tuple[int, bytes | memoryview]:
    """RAW, or RAW|ZLIB when deflating leaves fewer than `keep_below` x the raw bytes.
    `keep_below` 0: never try (a fast link). A big payload is first judged by a sample of
    16 KiB: incompressible data (dense random bits) costs a sample, not a deflate."""
    n = raw.nbytes
    if keep_below <= 0 or n < ZLIB_MIN:
        return Encoding.RAW, raw
    if n >= 4 * SAMPLE_PIECES * SAMPLE_PIECE:
        step = n // SAMPLE_PIECES
        sample = b"".join(raw[i * step : i * step + SAMPLE_PIECE]
                          for i in range(SAMPLE_PIECES))
        if len(_deflate(sample)) >= keep_below * len(sample):
            return Encoding.RAW, raw
    packed = _deflate(raw)
    if len(packed) < keep_below * n:
        return Encoding.RAW | Encoding.ZLIB, packed
    return Encoding.RAW, raw


def encode(words: np.ndarray, raw_keep_below: float = 0.0) -> tuple[int, bytes | memoryview]:
    """Pick the smallest encoding of `words` (whole chunks). Returns (enc, data).

    `raw_keep_below` > 0 (a slow link, decided by the caller): a payload left RAW is
    deflated when that shrinks it below this fraction of its size (see squeeze_raw)."""
    raw = memoryview(words).cast("B")
    nbits = words.size * 64
    ones = int(np.bitwise_count(words).sum())
    if RAW_LOW * nbits < ones < RAW_HIGH * nbits:
        # Mid density: raw wins unless the bits come in long runs. A strided sample of
        # words tells cheaply: runs show up as words that are all clear or all set.
        sample = words[::16]
        uniform = np.count_nonzero((sample == 0) | (sample == _ALL))
        if uniform * 2 < sample.size:
            return squeeze_raw(raw, raw_keep_below)
    best_enc, best = Encoding.RAW, raw
    edges = run_edges(words)
    nruns = int(np.bitwise_count(edges).sum()) + 1
    # Both forms cost about one varint per element: build only the one with fewer.
    if nruns <= ones or ones == nbits:
        bounds = np.concatenate(([0], set_positions(edges), [nbits]))
        cand, enc = leb128_encode(np.diff(bounds)), Encoding.RUNS
    else:
        pos = set_positions(words)
        cand, enc = leb128_encode(np.diff(pos, prepend=-1) - 1), Encoding.POSITIONS
    if len(cand) < raw.nbytes:
        best_enc, best = enc, cand
    if best_enc is Encoding.RAW:
        return squeeze_raw(raw, raw_keep_below)
    if len(best) >= ZLIB_MIN:
        packed = zlib.compress(best, ZLIB_LEVEL)
        if len(packed) < len(best):
            return best_enc | Encoding.ZLIB, packed
    return best_enc, best


def decode(enc: int, data: bytes | memoryview, raw_bytes: int) -> np.ndarray | memoryview:
    """The serialized words that `data` encodes, exactly `raw_bytes` long."""
    if enc & Encoding.ZLIB:
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, raw_bytes)
        except zlib.error as e:
            raise _bad(f"zlib: {e}") from None
        if d.unconsumed_tail:
            raise _bad(f"zlib payload inflates beyond the {raw_bytes} raw bytes of its chunks")
        if not d.eof or d.unused_data:
            raise _bad("zlib payload is truncated or has trailing bytes")
        data = out
        enc &= ~Encoding.ZLIB
    nbits = raw_bytes * 8
    if enc == Encoding.RAW:
        if memoryview(data).nbytes != raw_bytes:
            raise _bad(f"raw payload of {memoryview(data).nbytes} bytes, expected {raw_bytes}")
        return memoryview(data).cast("B")
    vals = leb128_decode(data)
    if enc == Encoding.POSITIONS:
        pos = np.cumsum(vals + _U64(1)) - _U64(1)  # gaps -> positions
        if pos.size and int(pos[-1]) >= nbits:
            raise _bad(f"set bit {int(pos[-1])} beyond the {nbits} bits of the chunks")
        return words_from_positions(pos.astype(np.int64), raw_bytes // 8)
    if enc == Encoding.RUNS:
        total = int(vals.sum()) if vals.size else 0
        if total != nbits:
            raise _bad(f"runs add up to {total} bits, the chunks hold {nbits}")
        if vals.size > 1 and not vals[1:].all():
            raise _bad("only the first run may be empty")
        bounds = np.cumsum(vals[:-1].astype(np.int64))  # where each run after the first starts
        bounds = bounds[bounds < nbits] if bounds.size else bounds
        return prefix_xor(words_from_positions(bounds, raw_bytes // 8))
    raise _bad(f"unknown encoding {enc}")
