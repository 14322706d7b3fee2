"""Protocol traces: one JSON object per line for every frame and every notable event.

Frame records carry header fields, and for payloads only their length and CRC-32, so a
trace can be compared frame for frame with one decoded from a packet capture.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import IO, Any

from bitmig.protocol.events import Event, Spans
from bitmig.protocol.runs import decode_runs
from bitmig.protocol.spec import FIELDS


def frame_record(direction: str, peer: str, event: Event, nbytes: int) -> dict[str, Any]:
    """The trace record of one frame (without times), shared by daemons and pcap decoding."""
    fields: dict[str, Any] = {}
    rec: dict[str, Any] = {
        "type": "frame", "dir": direction, "peer": peer,
        "kind": event.KIND.name.lower(), "bytes": nbytes, "fields": fields,
    }
    for f in FIELDS[event.KIND]:
        v = getattr(event, f.name)
        if f.name == "data":
            mv = memoryview(v).cast("B")
            rec["payload_len"] = mv.nbytes
            rec["payload_crc32"] = zlib.crc32(mv)
        elif isinstance(v, bytes):
            fields[f.name] = v.hex()
        elif isinstance(v, tuple):
            fields[f.name] = list(v)
        elif v is not None:
            fields[f.name] = v
    if type(event) is Spans:  # what a bits frame's count says: the chunks it carries
        _firsts, counts = decode_runs(event.runs)
        rec["runs"] = int(counts.size)
        rec["chunks"] = int(counts.sum())
    return rec


class Trace:
    """Writes trace records to a file; a Trace with no path records nothing."""

    def __init__(self, path: str | None, side: str) -> None:
        self.side = side
        self._f: IO[str] | None = None
        if path:
            # 0600 whatever the umask: a trace shows names, sizes and peers' addresses.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._f = open(fd, "a", buffering=1 << 16)

    @property
    def enabled(self) -> bool:
        return self._f is not None

    def _write(self, rec: dict[str, Any]) -> None:
        if self._f is None:
            return
        rec = {"mono": time.monotonic(), "wall": time.time(), "side": self.side, **rec}
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def frame(self, direction: str, peer: str, event: Event, nbytes: int) -> None:
        if self._f is not None:
            self._write(frame_record(direction, peer, event, nbytes))

    def event(self, type_: str, **fields: Any) -> None:
        self._write({"type": type_, **fields})

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
