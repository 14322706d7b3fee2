"""Helpers of `bitmig bench` (bitmig/bench.py): bitmaps, processes, a link proxy, scenarios."""
