"""Splitting a byte string at its frames' length prefixes, for tests and tools that hold
a whole stream (vectors, fuzzing, captures). A live connection uses Connection instead."""

from __future__ import annotations

from bitmig.protocol import spec


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole frames at the start of `data` (each with its prefix) and the rest: an
    incomplete frame, or everything from a zero length prefix on. No frame is decoded."""
    out: list[bytes] = []
    pos, n = 0, spec.LENGTH_PREFIX.size
    while len(data) - pos >= n:
        (size,) = spec.LENGTH_PREFIX.unpack_from(data, pos)
        if size == 0 or len(data) - pos - n < size:
            break
        out.append(data[pos : pos + n + size])
        pos += n + size
    return out, data[pos:]


def pieces(data: bytes) -> list[bytes]:
    """The whole frames of `data`, then the rest as one last piece if there is one."""
    frames, rest = split_frames(data)
    return [*frames, rest] if rest else frames
