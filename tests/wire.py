"""Test helper: the events of the whole frames in a byte string (a fake peer's view)."""

from __future__ import annotations

from bitmig.protocol.codec import decode_body
from bitmig.protocol.events import Event


def frames_of(buf: bytes) -> list[Event]:
    """Decode every complete frame at the start of `buf`; an incomplete tail is ignored."""
    out, pos = [], 0
    while pos + 4 <= len(buf):
        n = int.from_bytes(buf[pos : pos + 4], "big")
        if pos + 4 + n > len(buf):
            break
        out.append(decode_body(buf[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out
