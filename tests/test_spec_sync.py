"""proto/PROTOCOL.md and bitmig.protocol.spec must state the same facts.

Every frame kind and its number, every field with its type, range and presence, every error
code with its class and meaning, every encoding and every limit constant appears in the
document with its value; the event dataclasses have exactly the fields of spec.FIELDS; and
the worked example is what the code generates today.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitmig.protocol import spec
from bitmig.protocol.events import EVENT_TYPES
from bitmig.protocol.spec import Encoding, ErrorCode, Kind

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "proto" / "PROTOCOL.md"
DOC = DOC_PATH.read_text()
LINES = DOC.splitlines()
TYPE_NAMES = {int: "uint", str: "str", bool: "bool", bytes: "bin", list: "array of str"}
LIMITS = [
    *sorted(n for n in vars(spec)
            if n.startswith(("MAX_", "MIN_", "DIGEST_")) and type(getattr(spec, n)) is int),
    "PROTOCOL_VERSION",
]


def cells(line: str) -> list[str]:
    """The cells of a markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def rows_for(name: str) -> list[list[str]]:
    """Table rows whose first cell is `name` in backticks."""
    return [cells(ln) for ln in LINES if ln.startswith("|") and cells(ln)[0] == f"`{name}`"]


def section(heading: str) -> list[str]:
    """The lines of the section whose heading line is `heading`, up to the next heading."""
    start = LINES.index(heading)
    end = next((i for i in range(start + 1, len(LINES)) if LINES[i].startswith("#")),
               len(LINES))
    return LINES[start + 1 : end]


def field_range(f: spec.Field) -> str:
    if f.type is bool:
        r = "true / false"
    elif f.type is int:
        r = f"{f.lo}..{f.hi}"
    elif f.type is list:
        r = f"{f.lo}..{f.hi} items"
    else:
        r = f"{f.lo}..{f.hi} bytes"
    return f"{r}, {f.check_text}" if f.check_text else r


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_kind_in_table(kind: Kind) -> None:
    rows = [r for r in rows_for(kind.name) if len(r) >= 2 and r[1] == str(int(kind))]
    assert rows, f"PROTOCOL.md has no row | `{kind.name}` | {int(kind)} | in the kinds table"


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_fields_documented(kind: Kind) -> None:
    heading = f"### `{kind.name}` (kind {int(kind)})"
    assert heading in LINES, f"PROTOCOL.md lacks the section {heading!r}"
    body = section(heading)
    rows = [cells(ln) for ln in body if ln.startswith("| `")]
    want = [
        [f"`{f.name}`", TYPE_NAMES[f.type], field_range(f),
         "required" if f.required else "optional"]
        for f in spec.FIELDS[kind]
    ]
    assert [r[:4] for r in rows] == want, f"field table of {kind.name} differs from spec.FIELDS"
    if kind is not Kind.END:
        assert all(len(r) == 5 and r[4] for r in rows), "every field needs a meaning"


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.value)
def test_error_code_documented(code: ErrorCode) -> None:
    rows = rows_for(code.value)
    assert rows, f"PROTOCOL.md has no row for error code {code.value!r}"
    cls = "per-bitmap" if code in spec.BITMAP_ERRORS else "fatal"
    assert any(r[1] == cls and r[2] == spec.ERROR_MEANINGS[code] for r in rows), (
        f"row for {code.value!r} must read | `{code.value}` | {cls} | "
        f"{spec.ERROR_MEANINGS[code]} |"
    )


def test_every_code_has_a_meaning() -> None:
    assert set(spec.ERROR_MEANINGS) == set(ErrorCode)


@pytest.mark.parametrize("enc", list(Encoding), ids=lambda e: e.name)
def test_encoding_documented(enc: Encoding) -> None:
    rows = rows_for(enc.name)
    assert any(r[1:3] == [str(int(enc)), f"0x{int(enc):02x}"] for r in rows), (
        f"PROTOCOL.md has no row | `{enc.name}` | {int(enc)} | 0x{int(enc):02x} |"
    )


def test_valid_encodings_listed() -> None:
    listed = ", ".join(str(v) for v in sorted(spec.VALID_ENCODINGS))
    assert f"exactly {listed[: listed.rindex(',')]} and {sorted(spec.VALID_ENCODINGS)[-1]}" in DOC


@pytest.mark.parametrize("name", LIMITS)
def test_limit_documented(name: str) -> None:
    value = getattr(spec, name)
    assert any(r[1] == str(value) for r in rows_for(name)), (
        f"PROTOCOL.md has no row | `{name}` | {value} | in the limits table"
    )


def test_capabilities_and_roles_documented() -> None:
    for cap in spec.CAPABILITIES:
        assert f'`"{cap}"`' in DOC
    for role in spec.Role:
        assert f'`"{role}"`' in DOC


def test_framing_facts() -> None:
    assert spec.LENGTH_PREFIX.format == ">I" and "uint32 big-endian" in DOC
    assert f"`{spec.KIND_FIELD}`" in DOC


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_event_fields_match_spec(kind: Kind) -> None:
    cls = EVENT_TYPES[kind]
    assert cls.KIND is kind
    names = [f.name for f in dataclasses.fields(cls)]
    assert names == [f.name for f in spec.FIELDS[kind]]


def test_every_kind_has_an_event_type() -> None:
    assert set(EVENT_TYPES) == set(Kind)


def test_worked_example_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "make_vectors.py"), "--example"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert out.strip() in DOC, (
        "the worked example in PROTOCOL.md is stale: paste the output of "
        "`python proto/make_vectors.py --example` into section 13"
    )


def test_vectors_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "make_vectors.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    committed = ROOT / "proto" / "vectors"
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    old = {p.name: p.read_text() for p in committed.glob("*.json")}
    assert sorted(fresh) == sorted(old), "run `python proto/make_vectors.py`"
    stale = [n for n in fresh if fresh[n] != old[n]]
    assert not stale, f"stale vectors (run `python proto/make_vectors.py`): {stale}"


def test_no_unknown_constant_names_in_doc() -> None:
    """Every SCREAMING_CASE constant the document names in a table exists in spec."""
    named = set(re.findall(r"^\| `((?:MAX|MIN|DIGEST)_[A-Z0-9_]+)`", DOC, re.M))
    assert named <= set(LIMITS), named - set(LIMITS)


def test_wireshark_dissector_knows_every_kind_encoding_and_field() -> None:
    """proto/bitmig.lua repeats the kind, encoding and field names: keep them in step."""
    import re

    lua = (ROOT / "proto" / "bitmig.lua").read_text()
    kinds = dict(re.findall(r'\[(\d+)\] = "([a-z]+)"', lua.split("local ENCODINGS")[0]))
    assert kinds == {str(int(k)): k.name.lower() for k in Kind}
    encs = re.findall(r"\[0x([0-9a-f]+)\] =", lua.split("local ENCODINGS")[1].split("}")[0])
    assert {int(e, 16) for e in encs} == set(spec.VALID_ENCODINGS)
    declared = set(re.findall(r'"bitmig\.([a-z_]+)"', lua))
    for fields in spec.FIELDS.values():
        for fld in fields:
            name = {"caps": "cap", "data": "payload_len"}.get(fld.name, fld.name)
            assert name in declared, f"bitmig.lua declares no field for {fld.name!r}"
