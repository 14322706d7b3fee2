"""Mutual TLS between source and destination, with the standard library's ssl.

Both sides present a certificate signed by one CA (``--tls-ca``) and verify the
other's against it:

- the destination (server) requires a client certificate (CERT_REQUIRED) that chains
  to the CA; a source without one, or with one from another CA, or an expired one,
  is refused during the handshake, before any frame is read or any bitmap allocated;
- the source (client) verifies the destination's chain against the CA *and* its name.

Hostname checking is on. Mutual TLS usually has one CA issue both the destinations'
server certificates and the sources' client certificates; with chain-only checking any
holder of any of those certificates (a compromised source, say) could pose as a
destination and receive bitmaps. So the source checks that the destination's
certificate names the host it connects to: a DNS name, or an IP address SAN when it
connects by IP (Python matches IP SANs exactly). Operators who connect by an address
the certificate does not list pass ``--tls-server-name NAME`` (the name the
destination's certificate is issued for), which is then expected instead of the host
connected to. The destination does not check names in client certificates: the CA is
the authority on who may send.

Protocol: TLS 1.2 or newer; 1.3 is negotiated whenever both ends have it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from bitmig.daemon.channel import peer_name
from bitmig.protocol.errors import RemoteProtocolError
from bitmig.protocol.spec import ErrorCode

log = logging.getLogger("bitmig.daemon.tls")


class TLSConfigError(ValueError):
    """A certificate, key or CA file is missing, unreadable or invalid."""


class TLSError(OSError):
    """The TLS handshake with the peer failed; the message says with whom and why."""


class _ClientContext(ssl.SSLContext):
    """A client context that expects ``server_name`` instead of the host connected to.

    asyncio passes the host it connects to as server_hostname to wrap_bio; with
    server_name set, that name is used for SNI and hostname checking instead.
    """

    server_name: str | None = None

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False,
                 server_hostname: str | None = None, session: Any = None) -> ssl.SSLObject:
        if not server_side and self.server_name:
            server_hostname = self.server_name
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=server_hostname, session=session)


def _check_file(path: str, what: str) -> None:
    if not path:
        raise TLSConfigError(f"{what}: no path given")
    if not os.path.exists(path):
        raise TLSConfigError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise TLSConfigError(f"{what} {path}: not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def _load(ctx: ssl.SSLContext, cert: str, key: str, ca: str) -> ssl.SSLContext:
    _check_file(cert, "TLS certificate")
    _check_file(key, "TLS key")
    _check_file(ca, "TLS CA")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TLSConfigError(f"TLS certificate {cert} / key {key}: cannot load (not PEM, "
                             f"or the key does not match the certificate): {e}") from None
    except OSError as e:
        raise TLSConfigError(f"TLS certificate {cert} / key {key}: {e}") from None
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"TLS CA {ca}: cannot load (not a PEM certificate?): {e}") \
            from None
    return ctx


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The destination's context: its own certificate; client certificates required."""
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str,
                   server_name: str | None = None) -> ssl.SSLContext:
    """The source's context: its own certificate; the destination's chain and name
    verified (the name is ``server_name`` when given, else the host connected to)."""
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _load(ctx, cert, key, ca)
    ctx.check_hostname = True
    ctx.server_name = server_name or None
    return ctx


def contexts(cert: str | None, key: str | None, ca: str | None,
             server_name: str | None = None) -> tuple[ssl.SSLContext | None,
                                                       ssl.SSLContext | None]:
    """(server, client) contexts from the three paths, or (None, None) when none is
    given. Raises TLSConfigError when only some are given or a file is unusable."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        if server_name:
            raise TLSConfigError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
        return None, None
    missing = [flag for flag, v in given.items() if not v]
    if missing:
        raise TLSConfigError("TLS needs --tls-cert, --tls-key and --tls-ca together; "
                             f"missing {', '.join(missing)}")
    assert cert and key and ca
    return server_context(cert, key, ca), client_context(cert, key, ca, server_name)


def describe(exc: BaseException) -> str:
    """A one-line reason for a handshake failure."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        text = exc.reason.replace("_", " ").lower()
        if exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD",
                          "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
            text += " (is the peer speaking plain TCP instead of TLS?)"
        return text
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" in str(exc):
        return str(exc)
    if isinstance(exc, ConnectionError | EOFError):
        return ("the peer closed the connection during the handshake (it may have refused "
                "this side's certificate)")
    return str(exc) or type(exc).__name__


def before_hello(exc: Exception, host: str, port: int, using_tls: bool) -> Exception:
    """The error a source reports when its connection failed before the destination's
    hello: a TLSError naming the destination for TLS failures, a hint when a plain
    connection was dropped (as a TLS listener does), else ``exc`` itself."""
    closed = isinstance(exc, ConnectionError) or (
        isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.CLOSED)
    if isinstance(exc, ssl.SSLError):
        why = describe(exc)
    elif closed and using_tls:
        why = "the destination closed the connection (did it refuse this source's certificate?)"
    elif closed:
        return ConnectionError(f"{host}:{port} closed the connection before its hello "
                               "(does the destination require TLS?)")
    else:
        return exc
    return TLSError(f"TLS handshake with {host}:{port} failed: {why}")


async def accept(writer: asyncio.StreamWriter, ctx: ssl.SSLContext, timeout: float,
                 refused: Callable[[str, str], None]) -> bool:
    """Run the server side of the handshake on a fresh connection. A failure is logged
    (one line), reported to `refused(peer, why)` (the daemon counts and traces it), and the
    connection closed: returns False and nothing else happens for that peer."""
    peer = peer_name(writer)
    try:
        await writer.start_tls(ctx, ssl_handshake_timeout=timeout)
    except (OSError, TimeoutError, EOFError) as e:
        why = describe(e)
        log.warning("TLS handshake with %s failed: %s", peer, why)
        refused(peer, why)
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass
        return False
    return True
