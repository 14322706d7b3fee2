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


# -- statements of §5, §12 and §13 that the vectors and the example can check ----------

VECTORS = ROOT / "proto" / "vectors"
EXAMPLE_HEAD = re.compile(r"^\*\*(\d+)\. ([SD]) → [SD] `(\w+)`\*\*")


def example_frames() -> dict[int, tuple[str, str, dict[str, str]]]:
    """§13's frames by number: (sender, kind, the fields line as name -> value text)."""
    out = {}
    body = section("## 13. Worked example")
    for i, line in enumerate(body):
        m = EXAMPLE_HEAD.match(line)
        if m:
            fields = dict(re.findall(r"(\w+)=(\"[^\"]*\"|[^,\s]+)", body[i + 2]))
            out[int(m.group(1))] = (m.group(2), m.group(3), fields)
    return out


def test_cited_vectors_exist_and_fail_as_stated() -> None:
    """Each "(vector `NAME`)" the document cites exists; the §5 rules it backs (frames
    after end, bits before ready) fail with `unexpected`, as the sentences say."""
    import json

    cited = set(re.findall(r"vector\s+`([a-z0-9_]+)`", DOC))
    assert {"unexpected_frame_after_end", "unexpected_bits_before_ready"} <= cited
    for name in cited:
        path = VECTORS / f"{name}.json"
        assert path.exists(), f"PROTOCOL.md cites a vector that does not exist: {name}"
        v = json.loads(path.read_text())
        if name.startswith("unexpected_"):
            assert v["error"]["code"] == "unexpected", name
    before_ready = json.loads((VECTORS / "unexpected_bits_before_ready.json").read_text())
    assert before_ready["role"] == "destination"
    assert before_ready["frames"][0]["kind"] == "bits"
    after_end = json.loads((VECTORS / "unexpected_frame_after_end.json").read_text())
    assert "in state ending" in after_end["error"]["message_contains"]


def test_hello_timeout_default_stated() -> None:
    from bitmig.core import defaults

    text = " ".join(section("### 5.1 The connection"))
    assert f"{defaults.CONNECT_TIMEOUT:g} s by default" in text
    assert "`timeout`" in text and "MUST NOT speak first" in text


def test_example_prose_names_the_frames_it_describes() -> None:
    """"Frame N (`ENC` ..." and "How to read frame N" point at a bits frame of that
    encoding (issue 12: the text named frame 12 for frame 14)."""
    frames = example_frames()
    refs = re.findall(r"Frame (\d+) \(`([A-Z]+)`", DOC)
    assert refs
    for n, enc in refs:
        sender, kind, fields = frames[int(n)]
        assert (sender, kind, fields.get("enc")) == ("S", "bits", str(int(Encoding[enc]))), n
    (n,) = re.findall(r"How to read frame (\d+)", DOC)
    head = next(ln for ln in section("## 13. Worked example") if ln.startswith("    a3 65 6e 63"))
    enc = int(head.split()[4], 16)
    assert frames[int(n)][1] == "bits" and frames[int(n)][2]["enc"] == str(enc)


def test_completion_order_matches_section_12() -> None:
    """§12 step 4: one bitmap after the other, its last chunks immediately followed by its
    `complete`. The example's frames after the last mark echo must group that way."""
    frames = example_frames()
    last_mark = max(n for n, (s, k, _) in frames.items() if (s, k) == ("D", "mark"))
    seq = [(k, f["id"]) for n, (s, k, f) in sorted(frames.items())
           if n > last_mark and s == "S" and k in ("bits", "zeroes", "spans", "complete")]
    completed: list[str] = []
    for kind, bid in seq:
        assert bid not in completed, f"frames for bitmap {bid} after its complete"
        if kind == "complete":
            completed.append(bid)
        else:  # chunks of one bitmap follow the complete of the one before
            open_ids = {b for k, b in seq[:seq.index((kind, bid))] if b not in completed}
            assert open_ids <= {bid}, f"chunks of {bid} interleave with {open_ids}"
    assert len(completed) == 2
    step4 = " ".join(section("## 12. The source's algorithm (informative)"))
    assert "immediately followed by its `complete`" in step4
