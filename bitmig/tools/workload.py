"""A built-in write workload: random cluster writes (and a few resets) at a steady rate.

It stands in for a guest writing to its disks. During a freeze it pauses, as a guest
is paused during switchover; once a bitmap is handed off it stops writing to it.
Every batch it applies can be logged, so tests can replay them onto a reference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from bitmig.daemon.registry import Entry, Ownership

TICK = 0.005  # seconds between batches
# Writes owed are capped at a few ticks' worth: on a machine too busy to keep up, the
# workload writes less instead of owing ever larger batches that starve the migration.
MAX_OWED_TICKS = 4


class Workload:
    def __init__(self, entries: list[Entry], rate: float, reset_fraction: float = 0.0,
                 seed: int = 0, log: list[tuple[str, str, np.ndarray]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.entries = entries
        self.rate = rate
        self.reset_fraction = reset_fraction
        self.rng = np.random.default_rng(seed)
        self.log = log
        self.clock = clock  # tests pass a fake one
        self.writes = 0
        self.resets = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def step(self, n: int) -> None:
        """Apply n random operations now, spread over the writable bitmaps."""
        live = [e for e in self.entries if e.state in (Ownership.OWNED, Ownership.MIGRATING)]
        if not live or n <= 0:
            return
        for e, k in zip(live, self.rng.multinomial(n, [1 / len(live)] * len(live)), strict=True):
            if not k:
                continue
            bits = self.rng.integers(0, e.bitmap.nbits, int(k))
            nres = int(self.rng.binomial(int(k), self.reset_fraction)) if self.reset_fraction else 0
            if nres:
                e.bitmap.reset_many(bits[:nres])
                self.resets += nres
                if self.log is not None:
                    self.log.append((e.key, "reset", bits[:nres].copy()))
            e.bitmap.set_many(bits[nres:])
            self.writes += int(k) - nres
            if self.log is not None:
                self.log.append((e.key, "set", bits[nres:].copy()))

    async def _run(self) -> None:
        last = self.clock()
        owed = 0.0
        while True:
            await asyncio.sleep(TICK)
            now = self.clock()
            owed = min(owed + (now - last) * self.rate, self.rate * TICK * MAX_OWED_TICKS)
            last = now
            n = int(owed)
            owed -= n
            if any(e.state is Ownership.FROZEN for e in self.entries):
                owed = 0.0
                continue  # the guest is paused during switchover: these writes never happen
            self.step(n)
