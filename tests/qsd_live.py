"""qemu-storage-daemon fixtures for the live-QEMU tests: a daemon holding a qcow2 disk
with persistent bitmaps, its QMP socket and an NBD export, and a seeded writer.

No sleeps: `--daemonize` returns once the sockets listen, and stopping waits on a pidfd.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

HAVE_QSD = all(shutil.which(t) for t in ("qemu-storage-daemon", "qemu-img", "qemu-io"))


def make_image(path: Path, size: int, bitmaps: list[tuple[str, int, bool]]) -> None:
    """A qcow2 image with persistent bitmaps (name, granularity, enabled)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    for name, gran, enabled in bitmaps:
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(gran), str(path), name]
                       + ([] if enabled else ["--disable"]), check=True)


class Qsd:
    """One qemu-storage-daemon: node `disk0` on `image`, QMP at `qmp`, NBD at `nbd`."""

    def __init__(self, workdir: Path, tag: str, image: Path, nbd: bool = True) -> None:
        self.dir = workdir
        self.qmp = str(workdir / f"{tag}-qmp.sock")
        self.nbd = str(workdir / f"{tag}-nbd.sock")
        # A QMP socket serves one client at a time: bitmig gets `qmp`, the test's own
        # look at QEMU goes through a second monitor.
        self.ctl = str(workdir / f"{tag}-ctl.sock")
        self.image = image
        pidfile = workdir / f"{tag}.pid"
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,filename={image},node-name={tag}-file",
               "--blockdev", f"driver=qcow2,file={tag}-file,node-name=disk0",
               "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=m0",
               "--monitor", "chardev=m0",
               "--chardev", f"socket,path={self.ctl},server=on,wait=off,id=m1",
               "--monitor", "chardev=m1",
               "--daemonize", "--pidfile", str(pidfile)]
        if nbd:
            cmd += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                    "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"]
        subprocess.run(cmd, check=True, timeout=60)
        self.pid = int(pidfile.read_text())

    def command(self, cmd: str, **args: Any) -> Any:
        """One QMP command on a fresh connection (QEMU's view, independent of bitmig)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.ctl)
            f = s.makefile("rwb")
            f.readline()
            for c, a in (("qmp_capabilities", {}), (cmd, args)):
                f.write(json.dumps({"execute": c, "arguments": a}).encode() + b"\n")
                f.flush()
                while True:
                    r = json.loads(f.readline())
                    if "event" not in r:
                        break
            if "error" in r:
                raise RuntimeError(r["error"]["desc"])
            return r["return"]

    def bitmaps(self, node: str = "disk0", skip: str | None = None) -> dict[str, dict[str, Any]]:
        """name -> QEMU's info plus sha256, for every bitmap of the node but those whose
        name starts with `skip` (a running bitmig source replaces its recorders at any
        moment: one listed here may be gone by its sha256 query)."""
        for n in self.command("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                out = {}
                for b in n.get("dirty-bitmaps", []):
                    if skip is not None and b["name"].startswith(skip):
                        continue
                    info = {k: b[k] for k in ("granularity", "recording", "persistent",
                                              "count")}
                    info["sha256"] = self.command("x-debug-block-dirty-bitmap-sha256",
                                                  node=node, name=b["name"])["sha256"]
                    out[b["name"]] = info
                return out
        raise KeyError(node)

    def nodes(self) -> list[str]:
        return [n["node-name"] for n in self.command("query-named-block-nodes", flat=True)]

    def write(self, rng: np.random.Generator, n: int, size: int) -> None:
        """n writes of random ranges through the NBD export (as a guest would)."""
        cmds: list[str] = []
        for _ in range(n):
            off = int(rng.integers(0, size // 512)) * 512
            length = min(int(rng.integers(1, 512)) * 512, size - off)
            cmds += ["-c", f"write {off} {length}"]
        subprocess.run(["qemu-io", "--image-opts",
                        f"driver=nbd,server.type=unix,server.path={self.nbd},export=disk0",
                        *cmds], check=True, capture_output=True, timeout=120)

    async def awrite(self, rng: np.random.Generator, n: int, size: int) -> None:
        await asyncio.to_thread(self.write, rng, n, size)

    def stop(self) -> None:
        """Terminate and wait for the exit (pidfd: no polling)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            select.select([fd], [], [], 60)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)

    def kill(self) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
            select.select([fd], [], [], 60)
        finally:
            os.close(fd)
