"""`bitmig bench`: benchmarks against raw loopback TCP and peers (JSON output)."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub: Any, formatter: Any) -> None:
    b = sub.add_parser("bench", formatter_class=formatter, help="run the benchmarks")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true")
    b.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    print("bitmig bench: not implemented yet")
    return 2
