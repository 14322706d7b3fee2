"""Long fuzz run of the real destination session (outside CI).

Mutates the conformance vectors' frames (proto/vectors/*.json) and random bytes, and
feeds them, after each vector's context, to a Connection and the real
DestinationSession in memory (bitmig.session.memory.MemoryDestination; see
tests/fuzz_harness.py). Per-bitmap errors are refused and the stream goes on, as in the
daemon. Only protocol errors found in the input may end an input; any other exception,
or anything the session still holds afterwards, is printed with the input's hex.

    python scripts/fuzz_long.py [--count 1000000] [--seed 1] [--report-every 100000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_harness import load_seeds, mutate, random_splits, run_input


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report-every", type=int, default=100_000)
    p.add_argument("--max-failures", type=int, default=20)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    seeds = load_seeds()
    corpus = [s.data for s in seeds] + [f for s in seeds for _, f in s.context]
    failures: Counter[str] = Counter()
    shown = 0
    t0 = time.monotonic()
    for i in range(a.count):
        seed = rng.choice(seeds)
        r = rng.random()
        if r < 0.05:
            data = rng.randbytes(rng.randrange(0, 200))
        elif r < 0.10:
            data = seed.data
        else:
            data = mutate(rng, seed.data, corpus)
        splits = random_splits(rng, len(data))
        try:
            run_input(seed, data, splits)
        except Exception as e:  # anything but ProtocolError is a finding
            sig = f"{type(e).__name__}: {str(e)[:120]}"
            failures[sig] += 1
            if shown < a.max_failures:
                shown += 1
                print(f"FAIL #{i} seed={seed.name} splits={splits} data={data.hex()}")
                traceback.print_exc(limit=4)
        if a.report_every and (i + 1) % a.report_every == 0:
            print(f"{i + 1} inputs, {sum(failures.values())} failures, "
                  f"{time.monotonic() - t0:.0f}s", flush=True)
    dt = time.monotonic() - t0
    print(f"done: {a.count} inputs in {dt:.0f}s ({a.count / dt:.0f}/s), "
          f"{sum(failures.values())} failures")
    for sig, n in failures.most_common():
        print(f"  {n:8d}  {sig}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
