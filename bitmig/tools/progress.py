"""Progress lines of a running migration, as `bitmig source --migrate-to` and `bitmig demo`
print them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bitmig.core.units import format_size


def progress_printer(stream: Any, every: float = 0.5) -> Callable[[dict[str, Any]], None]:
    """A progress callback printing at most one line per `every` seconds to `stream`;
    the completion and done phases are always printed."""
    last = [0.0]

    def show(p: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] < every and p["phase"] not in ("completion", "done"):
            return
        last[0] = now
        rate = p["bytes_sent"] / p["elapsed_s"] if p["elapsed_s"] > 0 else 0
        print(f"  {p['elapsed_s']:7.2f}s  phase {p['phase']:<10} pass {p['pass']:>2}  "
              f"sent {format_size(p['bytes_sent']):>10}  pending "
              f"{format_size(p['pending_bytes']):>10}  {format_size(rate)}/s",
              file=stream, flush=True)

    return show
