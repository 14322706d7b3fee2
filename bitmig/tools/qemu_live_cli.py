"""`bitmig source --qmp` and `bitmig dest --qmp`: attach a daemon to a running QEMU
(wired from bitmig/cli.py; the QEMU work itself is in bitmig.qemu.live and
bitmig.qemu.live_target).

Source: the bitmaps are imported into the registry at start (one consistent copy, with
bitmig's recording bitmaps started in the same QMP transaction), deltas are folded in
every --poll-interval seconds, and the migration waits for `complete` before it freezes
(wait_for_complete); the daemon's before_freeze hook reads the last delta then, once the
writer has stopped, so no write QEMU recorded is missed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bitmig.daemon.registry import Ownership
from bitmig.qemu.live import LiveError, LiveSource
from bitmig.qemu.qmp import QMPError

log = logging.getLogger("bitmig.qemu")


class LiveAttachment:
    """A source daemon's bitmaps kept current from a running QEMU."""

    def __init__(self, daemon: Any, src: LiveSource, poll_interval: float) -> None:
        self.daemon = daemon
        self.src = src
        self.poll_interval = poll_interval
        self.entries: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self.poll_error: str | None = None

    async def start(self) -> None:
        """Import every bitmap into the registry and start folding deltas."""
        found = await self.src.open()
        for b in found:
            if (b.node, b.name) in self.daemon.registry.entries:
                raise LiveError(f"{b.node}/{b.name} is already owned here (from --state-dir?)")
        await self.src.snapshot()
        for b in found:
            assert b.bitmap is not None
            self.entries.append(self.daemon.registry.add(
                b.node, b.name, b.disk_size, b.granularity, b.bitmap.chunk_size, b.enabled,
                b.persistent, bitmap=b.bitmap))
        self.daemon.before_freeze.append(self.before_freeze)
        self._task = asyncio.create_task(self._loop())

    def _live(self) -> bool:
        return any(e.state is not Ownership.HANDED_OFF for e in self.entries)

    async def _loop(self) -> None:
        while self._live():
            await asyncio.sleep(self.poll_interval)
            if any(e.state is Ownership.FROZEN for e in self.entries):
                continue  # the freeze's own hook reads the last delta
            try:
                if not self.src.recording and all(
                        e.state is Ownership.OWNED for e in self.entries
                        if e.state is not Ownership.HANDED_OFF):
                    # An attempt failed after `finish` stopped recording: the guest may
                    # write again, so take a fresh consistent copy and record again.
                    await self.src.rearm()
                await self.src.poll()
                self.poll_error = None
            except (QMPError, LiveError) as e:
                # The copy may now miss writes; the freeze hook reconnects and re-reads
                # in full (the writer is stopped then), so nothing is lost.
                if self.poll_error is None:
                    log.warning("reading QEMU's delta failed: %s", e)
                self.poll_error = str(e)
                if isinstance(e, QMPError):
                    await self.src.disconnect()  # reconnected by rearm or finish
        await self.src.close()  # everything handed off: drop bitmig's recorders

    async def before_freeze(self) -> None:
        """The orchestrator said `complete`: the writer has stopped. The last delta (or a
        full re-read where QEMU's sha256 differs) goes into the bitmaps before freezing."""
        again = await self.src.finish()
        if again:
            log.info("re-read in full from QEMU: %s", ", ".join(f"{b.node}/{b.name}"
                                                            for b in again))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.src.close()


async def attach_source(daemon: Any, qmp: str, node: str | None, names: list[str] | None,
                        poll_interval: float, chunk_size: int, workdir: str | None = None
                        ) -> LiveAttachment | str:
    """The attachment, or an error message for the operator."""
    if not hasattr(daemon, "before_freeze"):
        return ("--qmp needs the freeze gate (Daemon.before_freeze, wait_for_complete), "
                "which this build lacks")
    src = LiveSource(qmp, node, names, workdir=workdir, chunk_size=chunk_size)
    att = LiveAttachment(daemon, src, poll_interval)
    try:
        await att.start()
    except (QMPError, LiveError) as e:
        await src.close()
        return str(e)
    return att


def make_target(qmp: str, maps: list[str] | None, replace: bool,
                workdir: str | None = None) -> Any:
    """A LiveTarget for `bitmig dest --qmp` (raises ValueError for a bad --map)."""
    from bitmig.qemu.live_target import LiveTarget
    from bitmig.qemu.mapping import Mapping

    mapping = Mapping.parse(maps)
    return LiveTarget(qmp, mapping.map if mapping else None, replace, workdir)
