"""The built-in workload on a machine too busy to keep up (a fake clock, no waiting)."""

from __future__ import annotations

import asyncio

import pytest

from bitmig.daemon.registry import Registry
from bitmig.tools.workload import MAX_OWED_TICKS, TICK, Workload


async def test_a_late_tick_writes_a_bounded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tick comes 1 s late (the event loop starved): the batch stays at most a few
    ticks' worth instead of a second's worth that grows with each late tick. Unbounded,
    test_trace_pcap's migration under load never finished (issue 12)."""
    clock = iter(range(1000))  # seconds: every reading is one second later
    e = Registry().add("n", "b", 1 << 40, 65536, 1024)
    wl = Workload([e], rate=200_000, seed=1, clock=lambda: float(next(clock)))
    batches: list[int] = []
    real = wl.step

    def step(n: int) -> None:
        batches.append(n)
        real(n)
        if len(batches) == 5:
            done.set()

    done = asyncio.Event()
    monkeypatch.setattr(wl, "step", step)
    wl.start()
    await done.wait()
    await wl.stop()
    assert batches and max(batches) <= 200_000 * TICK * MAX_OWED_TICKS, batches
    assert min(batches) > 0
