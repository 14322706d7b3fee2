"""Test helper: the events of the whole frames in a byte string (a fake peer's view)."""

from __future__ import annotations

from bitmig.protocol import spec
from bitmig.protocol.codec import decode_body
from bitmig.protocol.events import Event
from bitmig.protocol.framing import split_frames


def frames_of(buf: bytes) -> list[Event]:
    """Decode every complete frame at the start of `buf`; an incomplete tail is ignored."""
    return [decode_body(f[spec.LENGTH_PREFIX.size :]) for f in split_frames(buf)[0]]
