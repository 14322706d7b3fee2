"""Helpers of `bitmig bench` (bitmig/tools/bench_cli.py): bitmaps, processes, a link
proxy, scenarios."""
