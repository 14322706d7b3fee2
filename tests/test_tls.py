"""Mutual TLS between daemons: good peers migrate, every other peer is refused during the
handshake (before any bitmap is allocated), clearly; the CLI flags; the control socket."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme

from bitmig.daemon.control import attach_control
from bitmig.daemon.migration import MigrationOptions, MigrationResult
from bitmig.daemon.registry import Ownership
from bitmig.daemon.service import Daemon, tls

BITMIG = [sys.executable, "-m", "bitmig"]


class Pki(NamedTuple):
    cert: str
    key: str
    ca: str


def issue(tmp: Path, name: str, ca: trustme.CA, trust: trustme.CA | None = None,
          *identities: str, **kw: object) -> Pki:
    """A leaf certificate from `ca` for `identities`, trusting `trust` (default `ca`)."""
    leaf = ca.issue_cert(*(identities or ("127.0.0.1", "localhost")), **kw)
    cert, key, cafile = tmp / f"{name}.crt", tmp / f"{name}.key", tmp / f"{name}-ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    (trust or ca).cert_pem.write_to_path(str(cafile))
    return Pki(str(cert), str(key), str(cafile))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def rogue() -> trustme.CA:
    return trustme.CA()


def yesterday() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)


async def dest_with(tmp_path: Path, pki: Pki | None, **kw) -> tuple[Daemon, int]:
    server_ssl = tls.server_context(*pki) if pki else None
    d = Daemon("destination", str(tmp_path / "dest"), trace_path=str(tmp_path / "dest.jsonl"),
               connect_timeout=5, server_ssl=server_ssl, **kw)
    _, port = await d.listen("127.0.0.1", 0)
    return d, port


def source_with(pki: Pki | None, server_name: str | None = None) -> Daemon:
    client_ssl = tls.client_context(*pki, server_name=server_name) if pki else None
    src = Daemon("source", options=MigrationOptions(small_threshold=64 << 10, connect_timeout=5),
                 client_ssl=client_ssl)
    e = src.registry.add("drive0", "b0", 1 << 40, 65536, 1024)  # 2 MiB: live phase
    e.bitmap.set(0, 1 << 38)
    return src


async def tls_errors(d: Daemon, n: int = 1) -> None:
    """Wait until the destination has seen `n` failed handshakes (it may see the source
    give up only after the source has): a failed handshake ends its connection, which
    sets the daemon's connection-change event. The bound only catches a hang."""
    while d.errors["tls"] < n:
        d.connections_changed.clear()
        try:
            await asyncio.wait_for(d.connections_changed.wait(), 60)
        except TimeoutError:
            raise AssertionError(f"destination counted {dict(d.errors)}") from None
    await d.connections_closed()


def assert_nothing_allocated(d: Daemon) -> None:
    assert d.budget_used == 0
    assert not d.registry.entries and not d.reserved
    assert d.store is not None and not any(d.store.dir.iterdir())  # not even a spool file


def trace_errors(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert not any(r["type"] == "connection" for r in recs)  # no Receiver ever ran
    return [r for r in recs if r["type"] == "error"]


async def refused(tmp_path: Path, dest_pki: Pki | None, src_pki: Pki | None,
                  server_name: str | None = None) -> tuple[MigrationResult, Daemon]:
    dest, port = await dest_with(tmp_path, dest_pki)
    src = source_with(src_pki, server_name)
    result = await src.migrate("127.0.0.1", port)
    assert not result.ok and result.error
    assert src.registry.get("drive0", "b0").state is Ownership.OWNED  # still ours, intact
    if dest_pki is not None:
        await tls_errors(dest)
    assert_nothing_allocated(dest)
    await dest.close()
    return result, dest


# -- good peers ----------------------------------------------------------------------


async def test_good_peers_migrate_over_tls(tmp_path: Path, ca: trustme.CA) -> None:
    dest, port = await dest_with(tmp_path, issue(tmp_path, "dest", ca))
    src = source_with(issue(tmp_path, "src", ca))
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    got = dest.registry.get("drive0", "b0").bitmap
    assert got.sha256().hex() == result.bitmaps[0].sha256
    assert got.sha256() == src.registry.get("drive0", "b0").bitmap.sha256()
    assert result.bitmaps[0].live and not dest.errors
    await dest.close()


async def test_tls_1_3_is_negotiated(tmp_path: Path, ca: trustme.CA) -> None:
    pki = issue(tmp_path, "p", ca)
    seen: list[str | None] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(w.get_extra_info("ssl_object").version())
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server_context(*pki))
    port = server.sockets[0].getsockname()[1]
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client_context(*pki))
    assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
    w.close()
    server.close()
    assert tls.server_context(*pki).minimum_version is ssl.TLSVersion.TLSv1_2


# -- hostname checking ---------------------------------------------------------------


async def test_server_certificate_must_name_the_host(tmp_path: Path, ca: trustme.CA) -> None:
    dest_pki = issue(tmp_path, "dest", ca, None, "dest.example")  # no IP SAN
    result, _ = await refused(tmp_path, dest_pki, issue(tmp_path, "src", ca))
    assert "TLS handshake with 127.0.0.1:" in result.error
    assert "IP address mismatch" in result.error or "hostname mismatch" in result.error


async def test_tls_server_name_overrides_the_expected_name(tmp_path: Path,
                                                           ca: trustme.CA) -> None:
    dest, port = await dest_with(tmp_path, issue(tmp_path, "dest", ca, None, "dest.example"))
    src = source_with(issue(tmp_path, "src", ca), server_name="dest.example")
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    await dest.close()


# -- untrusted and expired peers -------------------------------------------------------


async def test_client_refuses_server_from_another_ca(tmp_path: Path, ca: trustme.CA,
                                                     rogue: trustme.CA) -> None:
    result, dest = await refused(tmp_path, issue(tmp_path, "dest", rogue, ca),
                                 issue(tmp_path, "src", ca))
    assert result.error.startswith("TLSError: TLS handshake with 127.0.0.1:")
    assert "certificate verify failed" in result.error
    assert dest.errors == {"tls": 1}


async def test_server_refuses_client_from_another_ca(tmp_path: Path, ca: trustme.CA,
                                                     rogue: trustme.CA,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bitmig")
    result, dest = await refused(tmp_path, issue(tmp_path, "dest", ca),
                                 issue(tmp_path, "src", rogue, ca))
    assert "TLS handshake with 127.0.0.1:" in result.error
    assert dest.errors == {"tls": 1}
    # One clear log line, no traceback; one traced error.
    recs = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(recs) == 1 and recs[0].exc_info is None
    assert "certificate verify failed" in recs[0].getMessage()
    errs = trace_errors(tmp_path / "dest.jsonl")
    assert len(errs) == 1 and errs[0]["code"] == "tls"
    assert "certificate verify failed" in errs[0]["message"]


async def test_client_refuses_expired_server_certificate(tmp_path: Path,
                                                         ca: trustme.CA) -> None:
    result, _ = await refused(tmp_path, issue(tmp_path, "dest", ca, not_after=yesterday()),
                              issue(tmp_path, "src", ca))
    assert "TLS handshake with 127.0.0.1:" in result.error
    assert "certificate has expired" in result.error


async def test_server_refuses_expired_client_certificate(tmp_path: Path,
                                                         ca: trustme.CA) -> None:
    _, dest = await refused(tmp_path, issue(tmp_path, "dest", ca),
                            issue(tmp_path, "src", ca, not_after=yesterday()))
    assert dest.errors == {"tls": 1}
    errs = trace_errors(tmp_path / "dest.jsonl")
    assert len(errs) == 1 and "certificate has expired" in errs[0]["message"]


async def test_plain_tcp_client_is_refused_by_a_tls_listener(tmp_path: Path,
                                                             ca: trustme.CA) -> None:
    result, dest = await refused(tmp_path, issue(tmp_path, "dest", ca), None)
    assert "closed the connection before its hello (does the destination require TLS?)" \
        in result.error
    assert dest.errors == {"tls": 1}
    errs = trace_errors(tmp_path / "dest.jsonl")
    assert len(errs) == 1 and "plain TCP" in errs[0]["message"]


async def test_tls_client_against_a_plain_listener_fails_clearly(tmp_path: Path,
                                                                 ca: trustme.CA) -> None:
    result, _ = await refused(tmp_path, None, issue(tmp_path, "src", ca))
    assert "TLS handshake with 127.0.0.1:" in result.error


async def test_silent_peer_is_dropped_after_the_handshake_timeout(tmp_path: Path,
                                                                  ca: trustme.CA) -> None:
    dest, port = await dest_with(tmp_path, issue(tmp_path, "dest", ca))
    dest.connect_timeout = 0.2
    _, w = await asyncio.open_connection("127.0.0.1", port)  # says nothing
    await tls_errors(dest)
    assert_nothing_allocated(dest)
    w.close()
    await dest.close()


# -- configuration -------------------------------------------------------------------


def test_contexts_need_all_three_files(tmp_path: Path, ca: trustme.CA) -> None:
    pki = issue(tmp_path, "p", ca)
    assert tls.contexts(None, None, None) == (None, None)
    with pytest.raises(tls.TLSConfigError, match="missing --tls-key, --tls-ca"):
        tls.contexts(pki.cert, None, None)
    with pytest.raises(tls.TLSConfigError, match="no such file"):
        tls.contexts(pki.cert, pki.key, str(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TLSConfigError, match="cannot load"):
        tls.contexts(str(tmp_path / "junk.pem"), pki.key, pki.ca)
    with pytest.raises(tls.TLSConfigError, match="cannot load"):
        tls.contexts(pki.cert, pki.key, str(tmp_path / "junk.pem"))
    with pytest.raises(tls.TLSConfigError, match="not a regular file"):
        tls.contexts(pki.cert, pki.key, str(tmp_path))
    server, client = tls.contexts(*pki)
    assert server.verify_mode is ssl.CERT_REQUIRED
    assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_is_reported(tmp_path: Path, ca: trustme.CA) -> None:
    pki = issue(tmp_path, "p", ca)
    os.chmod(pki.key, 0)
    with pytest.raises(tls.TLSConfigError, match="cannot read"):
        tls.contexts(*pki)


def dest_cmd(tmp_path: Path, listen: str, *extra: str) -> list[str]:
    return [*BITMIG, "dest", "--listen", listen, "--state-dir", str(tmp_path / "state"),
            "--control", str(tmp_path / "d.sock"), *extra]


def test_cli_dest_refuses_public_listen_without_tls(tmp_path: Path, ca: trustme.CA) -> None:
    out = subprocess.run(dest_cmd(tmp_path, "0.0.0.0:0"), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "without TLS" in out.stderr
    pki = issue(tmp_path, "p", ca)
    out = subprocess.run(dest_cmd(tmp_path, "0.0.0.0:0", "--tls-cert", pki.cert),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--tls-cert, --tls-key and --tls-ca together; missing --tls-key, --tls-ca" \
        in out.stderr


def test_cli_dest_with_tls_accepts_public_listen_and_migrates(tmp_path: Path,
                                                             ca: trustme.CA) -> None:
    dpki, spki = issue(tmp_path, "dest", ca), issue(tmp_path, "src", ca)
    env = {**os.environ, "BITMIG_TLS_CERT": dpki.cert, "BITMIG_TLS_KEY": dpki.key,
           "BITMIG_TLS_CA": dpki.ca}  # the environment works as well as the flags
    dest = subprocess.Popen(dest_cmd(tmp_path, "0.0.0.0:0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = dest.stdout.readline()
        assert line.startswith("listening on 0.0.0.0:"), dest.stderr.read()
        port = line.split()[2].rsplit(":", 1)[1]
        src = [*BITMIG, "source", "--create", "drive0/b0", "--disk-size", "1T", "--fill",
               "0.01", "--control", str(tmp_path / "s.sock"), "--migrate-to",
               f"127.0.0.1:{port}", "--retries", "1"]
        plain = subprocess.run(src, capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1 and "require TLS" in plain.stdout
        good = subprocess.run([*src, "--tls-cert", spki.cert, "--tls-key", spki.key,
                               "--tls-ca", spki.ca], capture_output=True, text=True,
                              timeout=60)
        assert good.returncode == 0, good.stdout + good.stderr
        assert json.loads(good.stdout.strip().splitlines()[-1])["ok"]
    finally:
        dest.terminate()
        _, err = dest.communicate(timeout=10)
    assert "TLS handshake with 127.0.0.1:" in err and "Traceback" not in err


def test_cli_source_reports_missing_tls_file(tmp_path: Path) -> None:
    out = subprocess.run([*BITMIG, "source", "--control", str(tmp_path / "s.sock"),
                          "--tls-cert", str(tmp_path / "a"), "--tls-key", str(tmp_path / "b"),
                          "--tls-ca", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no such file" in out.stderr


# -- control socket ------------------------------------------------------------------


async def test_control_socket_is_owner_only(tmp_path: Path) -> None:
    d = Daemon("source")
    path = tmp_path / "run" / "ctl.sock"
    old = os.umask(0)  # even under a permissive umask
    try:
        await attach_control(d, str(path))
    finally:
        os.umask(old)
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    await d.close()
