"""The run list of a spans frame: many (first, count) runs of chunks in one `runs` field.

On the wire the list is LEB128 numbers in pairs (skip, count): run i starts `skip` chunks
after the end of run i-1 (after chunk 0 for the first run) and holds `count` >= 1
chunks, so runs are strictly increasing and never overlap by construction. Vectorized
with numpy; every size is bounded before anything is allocated from it.
"""

from __future__ import annotations

import numpy as np

from bitmig.protocol import spec
from bitmig.protocol.encodings import leb128_decode, leb128_encode
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.spec import ErrorCode

Runs = tuple[np.ndarray, np.ndarray]  # (firsts, counts), int64, ascending, disjoint


def encode_runs(firsts: np.ndarray, counts: np.ndarray) -> bytes:
    """The `runs` field of ascending, disjoint runs (the caller's invariant)."""
    firsts = np.asarray(firsts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    ends = firsts + counts
    skips = firsts - np.concatenate(([0], ends[:-1]))
    return leb128_encode(np.column_stack((skips, counts)).ravel())


def decode_runs(data: bytes | memoryview) -> Runs:
    """(firsts, counts) of a `runs` field; raises bad_field unless it is a well-formed
    list of 1..MAX_SPAN_RUNS runs with counts >= 1."""
    n = memoryview(data).nbytes
    if n > spec.MAX_RUNS_BYTES:
        raise _bad(f"spans.runs is {n} bytes long, allowed at most {spec.MAX_RUNS_BYTES}")
    try:
        vals = leb128_decode(data).astype(np.int64)  # < 2**35 each: no overflow below
    except RemoteProtocolError as e:
        raise _bad(f"spans.runs: {e.message}") from None
    if vals.size == 0 or vals.size % 2:
        raise _bad(f"spans.runs holds {vals.size} numbers; it must be (skip, count) pairs")
    if vals.size // 2 > spec.MAX_SPAN_RUNS:
        raise _bad(f"spans.runs holds {vals.size // 2} runs, allowed at most "
                   f"{spec.MAX_SPAN_RUNS}")
    skips, counts = vals[0::2], vals[1::2]
    if not counts.all():
        raise _bad("spans.runs has a run of 0 chunks")
    ends = np.cumsum(skips + counts)
    return ends - counts, counts


def raw_bytes(firsts: np.ndarray, counts: np.ndarray, serialized: int, chunk_size: int) -> int:
    """Serialized bytes the runs cover (the last chunk of a bitmap may be short)."""
    total = int(counts.sum()) * chunk_size
    end = int(firsts[-1] + counts[-1]) * chunk_size
    return total - max(0, end - serialized)


def spread(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lengths[i]) without a Python loop."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FIELD, message)
