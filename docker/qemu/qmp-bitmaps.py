#!/usr/bin/env python3
"""Print QEMU's own view of every dirty bitmap, as JSON, from a QMP socket.

    qmp-bitmaps.py SOCK   ->   {"NODE": {"NAME": {"granularity": ..., "recording": ...,
                                 "persistent": ..., "busy": ..., "count": ..., "sha256": ...}}}

Standard library only and no bitmig code on purpose: the compose scenario checks what
QEMU says (query-named-block-nodes and x-debug-block-dirty-bitmap-sha256), not bitmig.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.reader.readline()
            if not line:
                raise SystemExit("qmp-bitmaps: QEMU closed the QMP connection")
            msg = json.loads(line)
            if "event" not in msg:  # events (e.g. JOB_STATUS_CHANGE) are not answers
                return msg

    def execute(self, cmd: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        msg = self._read()
        if "error" in msg:
            raise SystemExit(f"qmp-bitmaps: {cmd}: {msg['error'].get('desc', msg['error'])}")
        return msg["return"]


def bitmaps(qmp: QMP) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node in qmp.execute("query-named-block-nodes", flat=True):
        for b in node.get("dirty-bitmaps", []):
            nn, name = node["node-name"], b["name"]
            sha = qmp.execute("x-debug-block-dirty-bitmap-sha256", node=nn, name=name)
            out.setdefault(nn, {})[name] = {
                "granularity": b["granularity"], "recording": b["recording"],
                "persistent": b["persistent"], "busy": b["busy"], "count": b["count"],
                "sha256": sha["sha256"],
            }
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: qmp-bitmaps.py QMP_SOCKET")
    print(json.dumps(bitmaps(QMP(sys.argv[1])), indent=1, sort_keys=True))
