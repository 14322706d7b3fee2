"""The systemd units in deploy/systemd/ are valid for systemd itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parent.parent / "deploy" / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def verify(tmp_path: Path, text_of: dict[str, str]) -> subprocess.CompletedProcess[str]:
    paths = []
    for name, text in text_of.items():
        p = tmp_path / name
        p.write_text(text)
        paths.append(str(p))
    return subprocess.run([ANALYZE, "verify", *paths], capture_output=True, text=True,
                          timeout=120)


def installed(unit: Path) -> str:
    # The units run /opt/bitmig/bin/bitmig (docs/operations.md's install); verify checks that
    # the command exists, so point it at this machine's bitmig and leave the rest untouched.
    exe = shutil.which("bitmig")
    assert exe, "bitmig is not installed (pip install -e .)"
    text = unit.read_text()
    assert "ExecStart=/opt/bitmig/bin/bitmig " in text
    return text.replace("/opt/bitmig/bin/bitmig", exe)


def test_units_exist_for_both_daemons() -> None:
    assert [u.name for u in UNITS] == ["bitmig-dest.service", "bitmig-source.service"]
    assert "bitmig dest\n" in UNITS[0].read_text()
    assert "bitmig source\n" in UNITS[1].read_text()


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    r = verify(tmp_path, {u.name: installed(u) for u in UNITS})
    # verify exits 0 on settings it ignores, so its output must be empty too
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported."""
    text = installed(UNITS[0]).replace("Restart=on-failure", "Restart=sometimes")
    r = verify(tmp_path, {UNITS[0].name: text})
    assert "sometimes" in r.stderr
