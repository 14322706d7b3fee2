"""A fuzz target shared by tests/test_hostile.py and scripts/fuzz_long.py.

`run_input(seed, data, splits)` replays a vector's context into the real destination
session (bitmig.session.memory.MemoryDestination: Connection + DestinationSession),
feeds `data` in pieces, then EOF. Only RemoteProtocolError may escape, and the session
must hold nothing afterwards; anything else is a bug.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass
from pathlib import Path

import msgpack

from bitmig.protocol import spec
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.session.memory import MemoryDestination

VECTORS = Path(__file__).resolve().parent.parent / "proto" / "vectors"
MEMORY_BUDGET = 4 << 20  # bounds what the fuzz target rebuilds (parked bitmaps aside)


@dataclass
class Seed:
    name: str
    context: list[tuple[str, bytes]]  # (sender, frame bytes)
    data: bytes  # the frame(s) under test, sent by the source


def load_seeds() -> list[Seed]:
    seeds = []
    for f in sorted(glob.glob(str(VECTORS / "*.json"))):
        v = json.loads(Path(f).read_text())
        if v["role"] != "destination":
            continue
        ctx = [(c["sender"], bytes.fromhex(c["hex"])) for c in v["context"]]
        seeds.append(Seed(v["name"], ctx, bytes.fromhex(v["hex"])))
    return seeds


def run_input(seed: Seed, data: bytes, splits: list[int]) -> None:
    """Replay the seed's context, feed `data` cut at `splits`, then EOF, into the real
    destination session (in memory). Per-bitmap errors are refused and the stream goes
    on, as in the daemon. Raises only on a bug: an exception other than a protocol error
    found in the input, or anything held once the connection is over and parked bitmaps
    expired."""
    d = MemoryDestination(memory_budget=MEMORY_BUDGET)
    try:
        for sender, frame in seed.context:
            if sender == "source":  # the destination's own frames come from the session
                d.receive(frame)
        pos = 0
        for cut in [*sorted(splits), len(data)]:
            cut = min(max(cut, pos), len(data))
            d.receive(data[pos:cut])
            pos = cut
        d.receive_eof()
    except RemoteProtocolError:
        pass  # fatal: the connection is over and the session discarded its bitmaps
    it = d.intake
    it.handle_timer(float("inf"))  # what a cut parked expires
    assert it.budget_used == 0 and it.held == 0 and not it.reserved and not d.session.bitmaps, (
        f"left behind: budget {it.budget_used}, {it.held} held, {it.reserved}")


# -- mutations ---------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, 7, 8, 255, 256, 65535, 65536, spec.MAX_ID, spec.MAX_ID + 1,
                    (1 << 63) - 1, 1 << 63, spec.MAX_U64, -1, -(1 << 63), 1 << 31,
                    spec.MAX_FRAME_PAYLOAD, spec.MAX_FRAME_PAYLOAD + 1]


def _mutate_value(rng: random.Random, v):
    r = rng.random()
    if r < 0.5:
        return rng.choice(INTERESTING_INTS)
    if r < 0.6:
        return rng.randbytes(rng.randrange(0, 64))
    if r < 0.7:
        return "x" * rng.randrange(0, 40)
    if r < 0.8:
        return rng.choice([True, False, None, 1.5, [], {}, [1, 2]])
    if isinstance(v, int) and not isinstance(v, bool):
        return v + rng.choice([-1, 1, -2, 2, 1 << 20])
    if isinstance(v, bytes) and v:
        b = bytearray(v)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    return v


def structured(rng: random.Random, frame: bytes) -> bytes:
    """Decode a frame's msgpack map, change or drop a field, re-encode with a fresh prefix."""
    try:
        obj = msgpack.unpackb(frame[4:], raw=False, strict_map_key=False)
    except Exception:
        return frame
    if not isinstance(obj, dict) or not obj:
        return frame
    key = rng.choice(list(obj))
    r = rng.random()
    if r < 0.15:
        del obj[key]
    elif r < 0.25:
        obj[rng.choice(["extra", 7, "kind"])] = rng.choice(INTERESTING_INTS)
    else:
        obj[key] = _mutate_value(rng, obj[key])
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return frame
    return len(body).to_bytes(4, "big") + body


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # set a byte
            b[rng.randrange(len(b))] = rng.choice([0, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xCF,
                                                   0xD3, rng.randrange(256)])
        elif op == 2:  # insert bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and b:  # delete bytes
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 9)]
        elif op == 4 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 5:  # append another valid frame (splice)
            b += rng.choice(corpus)
        elif op == 6:  # structured field mutation
            b = bytearray(structured(rng, bytes(b)))
        elif op == 7 and len(b) >= 4:  # rewrite the length prefix
            n = rng.choice([0, 1, len(b) - 5, len(b) - 3, len(b), spec.MAX_FRAME_BYTES,
                            spec.MAX_FRAME_BYTES + 1, 0xFFFFFFFF])
            b[0:4] = max(0, min(n, 0xFFFFFFFF)).to_bytes(4, "big")
        elif op == 8:  # duplicate the data
            b += bytes(b)
    return bytes(b)


def random_splits(rng: random.Random, n: int) -> list[int]:
    if n <= 1 or rng.random() < 0.5:
        return []
    return [rng.randrange(n) for _ in range(rng.randrange(1, 4))]
