"""Where a destination delivers a verified bitmap besides its own store: a QEMU image or a
running QEMU (bitmig.qemu), for example.

A target is consulted twice per bitmap. `check` runs when a `start` arrives, before
`ready` is sent, so a name clash or an unknown node is refused before any chunk travels.
`deliver` runs after the bitmap was verified (and stored durably, when the daemon has a
state directory) and before the `ack`: the acknowledgement, and so the handoff, comes
only once the target holds the bitmap. Either raises TargetError to refuse the bitmap;
its code is one of the protocol's per-bitmap error codes (`exists`, `storage`, `limit`).
The destination session models both calls as actions whose completions come back as
events, so it stays free of I/O; the daemon carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bitmig.core.bitmap import DirtyBitmap
from bitmig.protocol.spec import ErrorCode


class TargetError(Exception):
    """A target refuses a bitmap; `code` goes into the per-bitmap error frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Incoming:
    """What a `start` frame says of a bitmap, as a target needs it."""

    node: str
    name: str
    disk_size: int
    granularity: int
    enabled: bool
    persistent: bool


class BitmapTarget(Protocol):
    """Implemented by bitmig.qemu's image and live-QEMU targets."""

    description: str  # for logs and traces, e.g. "qcow2 image /var/lib/x.qcow2"

    async def check(self, bitmap: Incoming) -> None:
        """Refuse early (TargetError) what deliver would refuse: clash, unknown node,
        geometry the target cannot hold."""

    async def deliver(self, bitmap: Incoming, data: DirtyBitmap) -> None:
        """Hand the verified bitmap to the target; return only once the target holds it
        durably. On failure the target must be left as it was, and TargetError raised."""
