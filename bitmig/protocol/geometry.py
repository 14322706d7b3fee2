"""A bitmap's geometry: the one place that turns (disk size, granularity, chunk size) into
bits, serialized bytes and chunks, and that checks a geometry against the protocol limits.

It sits in the protocol layer because the connection needs it to validate start and
bits frames before anything is allocated; the bitmap, the store, the CLI and the
tools use the same functions.
"""

from __future__ import annotations

from bitmig.protocol import spec

WORD_BYTES = 8  # the serialized form is little-endian 64-bit words


class GeometryError(ValueError):
    """A disk size, granularity or chunk size that no bitmap can have."""


def bit_count(disk_size: int, granularity: int) -> int:
    """Bits of the bitmap: one per cluster, the last cluster possibly partial."""
    return -(-disk_size // granularity)


def serialized_size(disk_size: int, granularity: int) -> int:
    """Bytes of the serialized bitmap: whole 64-bit words."""
    return -(-bit_count(disk_size, granularity) // 64) * WORD_BYTES


def chunk_count(serialized: int, chunk_size: int) -> int:
    """Chunks of `chunk_size` bytes covering `serialized` bytes (the last may be short)."""
    return -(-serialized // chunk_size)


def chunk_bytes(serialized: int, chunk_size: int, first: int, count: int) -> int:
    """Serialized bytes of chunks [first, first + count); the caller checks the range."""
    return min((first + count) * chunk_size, serialized) - first * chunk_size


def check_geometry(disk_size: int, granularity: int, chunk_size: int) -> None:
    """Raise GeometryError naming the first parameter that is out of the protocol's bounds
    (the same bounds the start frame's fields and the bitmap size limit impose)."""
    if not spec.is_power_of_two(granularity) or granularity < spec.MIN_GRANULARITY:
        raise GeometryError(
            f"granularity must be a power of two >= {spec.MIN_GRANULARITY}, got {granularity}"
        )
    if granularity > spec.MAX_GRANULARITY:
        raise GeometryError(f"granularity must be <= {spec.MAX_GRANULARITY}, got {granularity}")
    if not spec.is_power_of_two(chunk_size) or not (
        spec.MIN_CHUNK_SIZE <= chunk_size <= spec.MAX_CHUNK_SIZE
    ):
        raise GeometryError(
            f"chunk size must be a power of two in [{spec.MIN_CHUNK_SIZE}, "
            f"{spec.MAX_CHUNK_SIZE}], got {chunk_size}"
        )
    if disk_size < 1:
        raise GeometryError(f"disk size must be at least 1 byte, got {disk_size}")
    size = serialized_size(disk_size, granularity)
    if size > spec.MAX_BITMAP_BYTES:
        raise GeometryError(
            f"bitmap of {size} bytes exceeds the limit of {spec.MAX_BITMAP_BYTES} bytes "
            f"(disk {disk_size} B at granularity {granularity} B)"
        )
