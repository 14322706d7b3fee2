"""The conformance vectors of proto/vectors/ against the reference Connection and the real
destination session.

Each vector is decoded by a fresh Connection of the vector's role (after its context); on
the destination the events go through the real DestinationSession (in memory), whose own
frames must be the context's and whose per-bitmap refusals are the vector's error; every
decoded event is
re-encoded and must give back the exact bytes, and error vectors must raise the code and
message they name. Every frame kind and every error code must have a vector.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bitmig.protocol import spec
from bitmig.protocol.codec import encode, encode_bytes, event_to_map
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError, RemoteProtocolError
from bitmig.protocol.events import (
    EVENT_TYPES,
    BitmapFailed,
    Error,
    Event,
    Hello,
)
from bitmig.protocol.framing import pieces as split_pieces
from bitmig.protocol.spec import ErrorCode, Kind
from bitmig.protocol.state import Role
from bitmig.session.memory import MemoryDestination

VECTOR_DIR = Path(__file__).resolve().parent.parent / "proto" / "vectors"
VECTORS = {p.stem: json.loads(p.read_text()) for p in sorted(VECTOR_DIR.glob("*.json"))}

# Codes no byte pattern can make a receiver raise: they depend on the peer's own situation
# (its store, its memory budget, its clock, its bugs) or on its decision to give up. Each
# needs a vector that shows its error frame instead.
PEER_ONLY_CODES = {
    ErrorCode.EXISTS,
    ErrorCode.LIMIT,  # the memory-budget case; the size-limit case is raised from bytes too
    ErrorCode.STORAGE,
    ErrorCode.TIMEOUT,
    ErrorCode.INTERNAL,
    ErrorCode.ABORTED,
}
VECTOR_KEYS = {"name", "description", "role", "context", "hex", "eof", "frames", "canonical",
               "detected_by", "error"}


def to_json(ev: Event) -> dict[str, Any]:
    m = event_to_map(ev)
    out: dict[str, Any] = {}
    for k, v in m.items():
        if isinstance(v, bytes | bytearray | memoryview):
            v = bytes(v).hex()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    out["kind"] = Kind(m["kind"]).name.lower()
    return out


def from_json(m: dict[str, Any]) -> Event:
    kind = Kind[m["kind"].upper()]
    args: dict[str, Any] = {}
    for f in spec.FIELDS[kind]:
        if f.name in m:
            v = m[f.name]
            if f.type is bytes:
                v = bytes.fromhex(v)
            elif f.type is list:
                v = tuple(v)
            args[f.name] = v
    return EVENT_TYPES[kind](**args)


def same_frame(a: Event, b: Event) -> bool:
    """Equal, but a hello's agent string is this implementation's own."""
    if type(a) is Hello and type(b) is Hello:
        return replace(a, agent=None) == replace(b, agent=None)
    return a == b


class Replay:
    """A vector's receiving side: a Connection of the vector's role; on the destination,
    the real DestinationSession (in memory), whose frames must be the context's."""

    def __init__(self, role: Role) -> None:
        self.role = role
        # The session's frames go out when the context shows them (hold), so a vector
        # may show a state before the destination answered (e.g. bits before ready).
        self.dest = MemoryDestination(hold=True) if role is Role.DESTINATION else None
        self.conn = self.dest.conn if self.dest else Connection(role)

    def receive(self, data: bytes) -> list[Event]:
        """Events of `data`; a per-bitmap refusal by the session raises it as an error."""
        if self.dest is None:
            return self.conn.receive_data(data)
        refused = len(self.dest.refused)
        out = [e for e in self.dest.receive(data) if type(e) is not BitmapFailed]
        if len(self.dest.refused) > refused:
            r = self.dest.refused[refused]
            raise RemoteProtocolError(r.code, r.message, r.id)
        return out

    def feed_context(self, v: dict[str, Any]) -> None:
        for c in v["context"]:
            ev = from_json(c["frame"])
            if c["sender"] == self.role.value and self.dest is not None:
                assert self.dest.held, f"the context has {ev}, the session sent nothing"
                got = self.dest.release()
                assert same_frame(got, ev), f"the session sent {got}, the context {ev}"
            elif c["sender"] == self.role.value:
                sent = b"".join(bytes(b) for b in self.conn.send(ev))
                assert sent.hex() == c["hex"], "context frame does not encode to its hex"
            else:
                got = self.receive(bytes.fromhex(c["hex"]))
                assert [to_json(e) for e in got] == [c["frame"]]

    def run(self, pieces: list[bytes], eof: bool) -> tuple[list[Event], ProtocolError | None]:
        got: list[Event] = []
        try:
            for piece in pieces:
                got += self.receive(piece)
            if eof:
                if self.dest is not None:
                    self.dest.receive_eof()
                else:
                    self.conn.receive_eof()
        except ProtocolError as e:
            return got, e
        return got, None


def _run(v: dict[str, Any], pieces: list[bytes] | None = None):
    r = Replay(Role(v["role"]))
    r.feed_context(v)
    data = bytes.fromhex(v["hex"])
    return r.run(split_pieces(data) if pieces is None else pieces, v["eof"])


@pytest.mark.parametrize("name", list(VECTORS))
def test_vector(name: str) -> None:
    v = VECTORS[name]
    assert v["name"] == name
    assert VECTOR_KEYS <= set(v), f"vector lacks {VECTOR_KEYS - set(v)}"
    assert v["role"] in ("source", "destination")
    data = bytes.fromhex(v["hex"])
    got, err = _run(v)
    decoded = [to_json(e) for e in got]
    reencoded = b"".join(encode_bytes(e) for e in got)
    # encode() returns buffers to write in order; their concatenation is the frame.
    for e in got:
        assert b"".join(bytes(b) for b in encode(e)) == encode_bytes(e)
    if v["error"] is None:
        assert err is None, f"unexpected {err!r}"
        assert decoded == v["frames"]
        assert reencoded.hex() == (v["hex"] if v["canonical"] else v["canonical_hex"])
    else:
        assert err is not None, "the vector's error was not raised"
        assert str(err.code) == v["error"]["code"]
        assert v["error"]["message_contains"] in err.message, err.message
        assert decoded == v["frames"][: len(decoded)]
        if v["canonical"]:
            assert data.startswith(reencoded)


@pytest.mark.parametrize("name", [n for n, v in VECTORS.items() if v["error"] is None])
def test_vector_byte_by_byte(name: str) -> None:
    """A receiver must reassemble frames from any split of the stream."""
    v = VECTORS[name]
    data = bytes.fromhex(v["hex"])
    got, err = _run(v, [data[i : i + 1] for i in range(len(data))])
    assert err is None
    assert [to_json(e) for e in got] == v["frames"]


@pytest.mark.parametrize("name", [n for n, v in VECTORS.items() if v["error"] is None])
def test_vector_in_one_piece(name: str) -> None:
    v = VECTORS[name]
    got, err = _run(v, [bytes.fromhex(v["hex"])])
    assert err is None
    assert [to_json(e) for e in got] == v["frames"]


def test_every_kind_has_a_valid_vector() -> None:
    seen = {f["kind"] for v in VECTORS.values() if v["error"] is None for f in v["frames"]}
    missing = [k.name for k in Kind if k.name.lower() not in seen]
    assert not missing, f"frame kinds without a valid vector: {missing}"


def test_every_encoding_has_a_vector() -> None:
    seen = {f["enc"] for v in VECTORS.values() if v["error"] is None for f in v["frames"]
            if f["kind"] == "bits"}
    assert seen >= set(spec.VALID_ENCODINGS), sorted(set(spec.VALID_ENCODINGS) - seen)


def test_every_error_code_has_a_vector() -> None:
    raised = {v["error"]["code"] for v in VECTORS.values() if v["error"]}
    framed = {f["code"] for v in VECTORS.values() if v["error"] is None for f in v["frames"]
              if f["kind"] == "error"}
    missing = [c.value for c in ErrorCode
               if c.value not in (framed if c in PEER_ONLY_CODES else raised)]
    assert not missing, f"error codes without a vector: {missing}"


def test_error_frames_follow_the_id_rule() -> None:
    """Error frames in the vectors carry an id exactly when their code is per-bitmap."""
    for v in VECTORS.values():
        if v["error"] is not None:
            continue
        for f in v["frames"]:
            if f["kind"] == "error" and f["code"] in set(ErrorCode):
                assert ("id" in f) == (ErrorCode(f["code"]) in spec.BITMAP_ERRORS), v["name"]


def test_error_frame_is_reported_not_raised() -> None:
    """Receiving an error frame is not a protocol violation: it is an event."""
    v = VECTORS["error_exists"]
    got, err = _run(v)
    assert err is None and type(got[0]) is Error and got[0].id == 0
