"""The command line: info's table, two daemons as separate processes, the demo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BITMIG = [sys.executable, "-m", "bitmig"]

# The seed's table: chunk size -> disk area one meta bit covers, at 64 KiB granularity.
SEED_TABLE = [
    ("1M", 512 << 30), ("128K", 64 << 30), ("32K", 16 << 30), ("2K", 1 << 30),
    ("1K", 512 << 20), ("512", 256 << 20), ("256", 128 << 20), ("32", 16 << 20),
    ("2", 1 << 20),
]


@pytest.mark.parametrize(("chunk", "covers"), SEED_TABLE)
def test_info_reproduces_the_seed_table(chunk: str, covers: int) -> None:
    out = subprocess.run([*BITMIG, "info", "--disk-size", "16T", "--granularity", "64K",
                          "--chunk-size", chunk, "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["meta_bit_covers_bytes"] == covers
    assert info["serialized_bytes"] == 32 << 20


def test_info_rejects_bad_sizes() -> None:
    out = subprocess.run([*BITMIG, "info", "--disk-size", "12Q"], capture_output=True, text=True)
    assert out.returncode == 2 and "not a size" in out.stderr


@pytest.mark.parametrize(("args", "reason"), [
    (["--disk-size", "0"], "disk size must be at least 1 byte"),
    (["--disk-size", "1T", "--granularity", "4G"], "granularity must be <= 2147483648"),
    (["--disk-size", "16T", "--chunk-size", "4"], "chunk size must be a power of two in [8,"),
    (["--disk-size", "1P", "--granularity", "512"], "exceeds the limit of 4294967296 bytes"),
])
def test_info_says_why_a_geometry_cannot_migrate(
        args: list[str], reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: info is arithmetic, and it must use the daemon's own geometry check
    from bitmig.cli import main
    from bitmig.daemon.registry import Registry, RegistryError

    assert main(["info", *args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["migratable"] is False
    assert main(["info", *args]) == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: this geometry cannot be migrated: ") and reason in note
    with pytest.raises(RegistryError, match=re.escape(reason)):
        Registry().add("n", "b", info["disk_size"], info["granularity"], info["chunk_size"])


@pytest.mark.parametrize("cmd", ["source", "dest", "demo", "info", "ctl", "trace", "bench"])
def test_every_command_has_help(cmd: str) -> None:
    out = subprocess.run([*BITMIG, cmd, "--help"], capture_output=True, text=True, check=True)
    assert "usage: bitmig " + cmd in out.stdout


def test_dest_refuses_plain_tcp_on_a_public_address(tmp_path: Path) -> None:
    out = subprocess.run([*BITMIG, "dest", "--listen", "0.0.0.0:0", "--state-dir",
                          str(tmp_path), "--control", str(tmp_path / "c.sock")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "without TLS" in out.stderr


def test_two_daemons_as_separate_processes(tmp_path: Path) -> None:
    sock = tmp_path / "dest.sock"
    dest = subprocess.Popen([*BITMIG, "dest", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--control", str(sock)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = dest.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        port = line.split()[2].rsplit(":", 1)[1]
        src = subprocess.run(
            [*BITMIG, "source", "--create", "drive0/b0", "--create", "drive1/b1",
             "--disk-size", "4T", "--fill", "0.05", "--workload-rate", "5000",
             "--small-threshold", "64K", "--control", str(tmp_path / "src.sock"),
             "--migrate-to", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120)
        assert src.returncode == 0, src.stderr
        result = json.loads(src.stdout.strip().splitlines()[-1])
        assert result["ok"] and len(result["bitmaps"]) == 2
        for b in result["bitmaps"]:
            q = subprocess.run([*BITMIG, "ctl", str(sock), "query", f"node={b['node']}",
                                f"name={b['name']}"], capture_output=True, text=True,
                               check=True)
            assert json.loads(q.stdout)["sha256"] == b["sha256"]
        listing = json.loads(subprocess.run([*BITMIG, "ctl", str(sock), "list"],
                                            capture_output=True, text=True,
                                            check=True).stdout)
        assert {(e["node"], e["name"]) for e in listing} == {("drive0", "b0"), ("drive1", "b1")}
        bad = subprocess.run([*BITMIG, "ctl", str(sock), "query", "node=x", "name=y"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and "no bitmap x/y" in bad.stderr
        assert oct((sock.stat().st_mode) & 0o777) == "0o600"
    finally:
        dest.terminate()
        dest.wait(timeout=10)


def test_demo_json_is_verified() -> None:
    out = subprocess.run([*BITMIG, "demo", "--json", "--disk-size", "4T"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    for key in ("verified", "source_digest", "dest_digest", "downtime_ms", "bytes_sent",
                "bitmap_bytes", "passes", "skipped_live"):
        assert key in s
    assert s["verified"] is True
    assert s["source_digest"] == s["dest_digest"] and len(s["source_digest"]) == 64
    assert s["bitmap_bytes"] == 8 << 20 and s["bytes_sent"] > 0


def test_ctl_migrate_exit_status_says_whether_the_migration_worked(tmp_path: Path) -> None:
    sock = tmp_path / "src.sock"
    src = subprocess.Popen([*BITMIG, "source", "--create", "n/b", "--disk-size", "1T",
                            "--control", str(sock), "--connect-timeout", "1"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert src.stdout.readline().startswith("control ")
        out = subprocess.run([*BITMIG, "ctl", str(sock), "migrate", "host=127.0.0.1",
                              "port=1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert json.loads(out.stdout)["ok"] is False
    finally:
        src.terminate()
        src.wait(timeout=10)


def test_bad_insecure_value_only_breaks_dest(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "BITMIG_INSECURE": "maybe"}
    ok = subprocess.run([*BITMIG, "info", "--disk-size", "1T"], env=env, capture_output=True,
                        text=True)
    assert ok.returncode == 0
    bad = subprocess.run([*BITMIG, "dest", "--listen", "0.0.0.0:0", "--state-dir",
                          str(tmp_path), "--control", str(tmp_path / "c.sock")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "BITMIG_INSECURE must be" in bad.stderr


def test_migration_options_from_the_command_line() -> None:
    from bitmig.cli import _options, build_parser

    a = build_parser().parse_args(["source", "--wait-for-complete", "--retries", "5",
                                   "--retry-delay", "0.25", "--small-threshold", "64K"])
    o = _options(a)
    assert (o.wait_for_complete, o.retries, o.retry_delay, o.small_threshold) == \
        (True, 5, 0.25, 65536)
    d = _options(build_parser().parse_args(["dest", "--retries", "2"]))
    assert d.retries == 2 and not d.wait_for_complete
    bad = subprocess.run([*BITMIG, "source", "--retries", "-1", "--control",
                          "/nonexistent/x.sock"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "bitmig source: 'retries' must be a whole number in [0, 1000], got -1" in bad.stderr
