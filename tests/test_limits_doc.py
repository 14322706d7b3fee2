"""docs/reliability.md §4.1 states every limit; its numbers must be the code's (issue 9),
and docs/control.md must say what the code does with bitmaps added on a destination."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bitmig.core import defaults
from bitmig.daemon import control, metrics
from bitmig.daemon.control import handle_request
from bitmig.daemon.service import Daemon
from bitmig.protocol import spec

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"spec": spec, "defaults": defaults, "control": control, "metrics": metrics}


def limit_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "reliability.md").read_text()
    section = text.split("## 4.1 Limits", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in section.splitlines() if ln.startswith("| ")]
    return rows[1:]  # without the heading row


def test_every_limit_in_the_doc_is_the_codes_number() -> None:
    rows = limit_rows()
    assert len(rows) >= 15
    checked = set()
    for limit, value, code, _ in rows:
        names = re.findall(r"`(\w+)\.([A-Z_]+)`", code)
        assert names, f"row {limit!r} names no constant"
        mod, name = names[0]
        want = getattr(MODULES[mod], name)
        m = re.match(r"([\d.]+)", value)
        if m is None:
            continue  # a row that states a composition (descriptors), checked below
        got = float(m.group(1))
        assert got == want, f"{limit}: doc says {value!r}, {mod}.{name} = {want}"
        checked.add(f"{mod}.{name}")
    # The limits issue 9 asks for are all there.
    assert {"spec.MAX_BITMAPS", "spec.MAX_FRAME_BYTES", "spec.MAX_NAME_BYTES",
            "defaults.MEMORY_BUDGET", "defaults.MAX_CONNECTIONS",
            "defaults.MAX_CONNECTIONS_PER_PEER", "defaults.CONNECTION_MEMORY"} <= checked
    desc = [r for r in rows if r[0] == "descriptors"]
    assert desc and f"at most {defaults.MAX_CONNECTIONS}" in desc[0][1]


def test_connection_memory_row_states_the_product() -> None:
    row = next(r for r in limit_rows() if r[2].startswith("`defaults.CONNECTION_MEMORY`"))
    total = defaults.MAX_CONNECTIONS * defaults.CONNECTION_MEMORY
    assert f"about {round(total / (1 << 20))} MiB" in row[3], row[3]


async def test_bitmaps_added_on_a_destination_are_stored_at_exit(tmp_path) -> None:
    """Item 10: control.md said they live in memory only; the code stores them at exit."""
    text = (ROOT / "docs" / "control.md").read_text()
    assert "live in memory only" not in text
    assert "stored in its state" in text and "directory when it exits" in text
    state = str(tmp_path / "d")
    d = Daemon("destination", state)
    ans = await handle_request(d, b'{"cmd": "add", "node": "n", "name": "a", '
                                  b'"disk_size": "1G", "fill": 0.3, "seed": 4}')
    assert ans["ok"], ans
    words = d.registry.get("n", "a").bitmap.words.copy()
    assert await d.close() == []
    again = Daemon("destination", state)
    assert np.array_equal(again.registry.get("n", "a").bitmap.words, words)
    # remove deletes the stored file too (control.md says so): gone after a restart.
    assert (await handle_request(again, b'{"cmd": "remove", "node": "n", "name": "a"}'))["ok"]
    await again.close()
    assert "n" not in {k[0] for k in Daemon("destination", state).registry.entries}
