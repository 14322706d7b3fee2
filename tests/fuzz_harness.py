"""A fuzz target shared by tests/test_hostile.py and scripts/fuzz_long.py.

`run_input(seed, data, splits)` replays a vector's context into a destination-side
Connection, feeds `data` in pieces, and drives every bits/zeroes/complete event through
an Assembly, as the receiver would. Only ProtocolError may escape; anything else is a bug.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass
from pathlib import Path

import msgpack

from bitmig.core.assembly import Assembly
from bitmig.protocol import spec
from bitmig.protocol.codec import decode_body
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError
from bitmig.protocol.events import BitmapFailed, Bits, Complete, Error, Start, Zeroes
from bitmig.protocol.state import Role

VECTORS = Path(__file__).resolve().parent.parent / "proto" / "vectors"
MAX_ASSEMBLY = 1 << 20  # the fuzz target rebuilds bitmaps up to this size (the budget)


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


class Target:
    """One destination connection plus the assemblies its start frames asked for."""

    def __init__(self, seed: Seed) -> None:
        self.conn = Connection(Role.DESTINATION)
        self.asms: dict[int, Assembly] = {}
        for sender, frame in seed.context:
            if sender == "destination":
                self.conn.send(decode_body(frame[4:]))
            else:
                self.handle(self.conn.receive_data(frame))

    def handle(self, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is Start:
                geo = self.conn.bitmaps[ev.id]
                if geo.serialized_size <= MAX_ASSEMBLY:
                    self.asms[ev.id] = Assembly(ev)
            elif t is Bits or t is Zeroes:
                asm = self.asms.get(ev.id)
                if asm is not None:
                    asm.apply(ev)
            elif t is Complete:
                asm = self.asms.pop(ev.id, None)
                if asm is not None:
                    asm.verify(ev)
            elif t is BitmapFailed:
                self.asms.pop(ev.id, None)  # the receiver refuses it and goes on
            elif t is Error and ev.id is not None:
                self.asms.pop(ev.id, None)  # the source aborted it: the receiver drops it

    def feed(self, data: bytes, splits: list[int]) -> None:
        pos = 0
        for cut in [*sorted(splits), len(data)]:
            cut = min(max(cut, pos), len(data))
            try:
                self.handle(self.conn.receive_data(data[pos:cut]))
            except ProtocolError as e:
                if e.bitmap_id is None or e.code not in spec.BITMAP_ERRORS:
                    return  # fatal: the receiver sends the error frame and closes
                self.asms.pop(e.bitmap_id, None)  # per-bitmap: the bitmap is dropped
                return
            pos = cut
        try:
            self.conn.receive_eof()
        except ProtocolError:
            pass


def run_input(seed: Seed, data: bytes, splits: list[int]) -> None:
    """Raises only if something other than ProtocolError escapes (that is a bug)."""
    Target(seed).feed(data, splits)


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
