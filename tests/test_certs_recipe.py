"""Issue 9 item 11: the certificate recipe of docs/operations.md §3.1, run exactly as
written, gives certificates with which a mutual-TLS migration works."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BITMIG = [sys.executable, "-m", "bitmig"]


def recipe() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### 3.1 Making a test CA and the two certificates", 1)[1]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "docs/operations.md §3.1 lost its ```sh recipe"
    return m.group(1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_documented_recipe_gives_working_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    env = {**os.environ, "DEST_DNS": "localhost", "DEST_IP": "127.0.0.1"}
    out = subprocess.run(["sh", "-c", recipe()], cwd=pki, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in pki.iterdir()) == ["ca.key", "ca.pem", "dest.key",
                                                     "dest.pem", "source.key", "source.pem"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in pki.glob("*.key"))

    def tls(side: str) -> list[str]:
        return ["--tls-cert", str(pki / f"{side}.pem"), "--tls-key", str(pki / f"{side}.key"),
                "--tls-ca", str(pki / "ca.pem")]

    dest = subprocess.Popen([*BITMIG, "dest", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--control", str(tmp_path / "d.sock"),
                             *tls("dest")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = dest.stdout.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, (line, dest.stderr.read() if dest.poll() is not None else "")
        port = m.group(1)
        runs = {}
        for host in ("127.0.0.1", "localhost"):  # by the IP SAN and by the DNS SAN
            src = subprocess.run(
                [*BITMIG, "source", "--create", f"drive0/{host}", "--disk-size", "64G",
                 "--fill", "0.1", "--control", str(tmp_path / "s.sock"), "--migrate-to",
                 f"{host}:{port}", "--retries", "1", *tls("source")],
                capture_output=True, text=True, timeout=300)
            assert src.returncode == 0, src.stderr
            runs[host] = json.loads(src.stdout.strip().splitlines()[-1])
        # A source presenting the destination's (server-only) certificate is refused.
        bad = subprocess.run(
            [*BITMIG, "source", "--create", "drive0/bad", "--disk-size", "1G", "--control",
             str(tmp_path / "b.sock"), "--migrate-to", f"127.0.0.1:{port}", "--retries", "1",
             "--tls-cert", str(pki / "dest.pem"), "--tls-key", str(pki / "dest.key"),
             "--tls-ca", str(pki / "ca.pem")], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1
    finally:
        dest.terminate()
        dest.wait(60)
    for host, r in runs.items():
        assert r["ok"] and r["bitmaps"][0]["name"] == host and r["bitmaps"][0]["sha256"]
