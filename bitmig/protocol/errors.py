"""Typed protocol errors: every violation carries a code from spec.ErrorCode."""

from __future__ import annotations

from bitmig.protocol.spec import ErrorCode


class ProtocolError(Exception):
    """A protocol violation: `code` says which kind, the message says what was wrong."""

    def __init__(self, code: ErrorCode, message: str, bitmap_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.bitmap_id = bitmap_id


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug here)."""


class PeerError(Exception):
    """The peer reported an error frame."""

    def __init__(self, code: str, message: str, bitmap_id: int | None = None) -> None:
        where = f" (bitmap id {bitmap_id})" if bitmap_id is not None else ""
        super().__init__(f"peer reported {code}{where}: {message}")
        self.code = code
        self.message = message
        self.bitmap_id = bitmap_id
