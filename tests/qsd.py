"""A qemu-storage-daemon with a QMP monitor on a unix socket, for tests that ask QEMU
itself about images (x-debug-block-dirty-bitmap-sha256, query-named-block-nodes).

No sleeps: the QMP socket is created with the daemon's --pidfile/--daemonize
handshake (qemu-storage-daemon --daemonize returns once the monitor listens).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

HAVE_QEMU = all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-storage-daemon"))
TIMEOUT = 120.0


class QMPError(Exception):
    pass


class StorageDaemon:
    """qemu-storage-daemon opening `images` (qcow2) as nodes node0, node1, ..."""

    def __init__(self, images: list[str | os.PathLike[str]], read_only: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="bitmig-qsd-")
        self.sock_path = os.path.join(self.dir, "qmp.sock")
        self.pidfile = os.path.join(self.dir, "qsd.pid")
        args = ["qemu-storage-daemon", "--daemonize", "--pidfile", self.pidfile,
                "--chardev", f"socket,id=qmp,path={self.sock_path},server=on,wait=off",
                "--monitor", "chardev=qmp"]
        for i, img in enumerate(images):
            spec = {"driver": "qcow2", "node-name": f"node{i}", "read-only": read_only,
                    "file": {"driver": "file", "filename": str(img)}}
            args += ["--blockdev", json.dumps(spec)]
        # --daemonize: the parent exits only once the monitor socket is listening
        p = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if p.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise QMPError(f"qemu-storage-daemon failed: {p.stderr.strip()}")
        self.pid = int(Path(self.pidfile).read_text())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.sock_path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise QMPError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, execute: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": execute}
        if arguments:
            req["arguments"] = arguments
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        resp = self._read()
        if "error" in resp:
            raise QMPError(resp["error"].get("desc", str(resp["error"])))
        return resp["return"]

    def sha256(self, node: str, name: str) -> str:
        return self.cmd("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]

    def bitmaps(self, node: str) -> list[dict[str, Any]]:
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return n.get("dirty-bitmaps", [])
        raise QMPError(f"no node {node}")

    def close(self) -> None:
        """quit over QMP (closes the images cleanly), then wait for the process."""
        try:
            self.cmd("quit")
        except (QMPError, OSError):
            os.kill(self.pid, signal.SIGKILL)
        finally:
            self.file.close()
            self.sock.close()
        # the daemon is not our child (it daemonized): wait until its pid is gone
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            import select

            select.select([fd], [], [], TIMEOUT)
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> StorageDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qemu_sha256s(image: str | os.PathLike[str]) -> dict[str, str]:
    """Every bitmap's sha256 as QEMU computes it, the image opened read-only."""
    with StorageDaemon([image]) as d:
        return {b["name"]: d.sha256("node0", b["name"]) for b in d.bitmaps("node0")}
