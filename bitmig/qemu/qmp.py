"""A small asyncio QMP client over a unix socket.

Our own rather than the `qemu.qmp` package: bitmig needs only greeting, capabilities
negotiation and `execute` (one command at a time, events skipped), and a hard timeout on
every wait, which is ~100 lines and no new dependency. Every failure becomes a QMPError
with a message an operator can act on (socket refused, not QMP, QEMU's class and desc).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

MAX_LINE = 64 << 20  # a query-named-block-nodes answer of a big VM is far below this


class QMPError(Exception):
    """A QMP connection or command failed; `qmp_class` is QEMU's error class, if any."""

    def __init__(self, message: str, qmp_class: str | None = None) -> None:
        super().__init__(message)
        self.qmp_class = qmp_class


class QMPClient:
    """One QMP connection. Use `await QMPClient.connect(path)`; `close()` when done."""

    def __init__(self, path: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.version: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one command in flight: answers are read in order

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> QMPClient:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
        except TimeoutError:
            raise QMPError(f"QMP socket {path}: no connection within {timeout:g} s") from None
        except OSError as e:
            raise QMPError(f"QMP socket {path}: cannot connect: {e.strerror or e}") from None
        client = cls(path, reader, writer, timeout)
        try:
            greeting = await client._read()
            if not isinstance(greeting.get("QMP"), dict):
                raise QMPError(f"{path} is not a QMP socket (no QMP greeting)")
            client.version = greeting["QMP"].get("version", {})
            await client.execute("qmp_capabilities")
        except BaseException:
            await client.close()
            raise
        return client

    async def _read(self) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self._reader.readline(), self.timeout)
        except TimeoutError:
            raise QMPError(f"QMP socket {self.path}: no answer within {self.timeout:g} s") from None
        except (OSError, ValueError) as e:  # ValueError: line longer than MAX_LINE
            raise QMPError(f"QMP socket {self.path}: {e}") from None
        if not line:
            raise QMPError(f"QMP socket {self.path}: connection closed by QEMU")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"{self.path} is not a QMP socket (answer is not JSON)") from None
        if not isinstance(msg, dict):
            raise QMPError(f"{self.path} is not a QMP socket (answer is not a JSON object)")
        return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; return its `return` value or raise QMPError(QEMU's desc)."""
        async with self._lock:
            ident = f"bitmig-{next(self._ids)}"
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                msg["arguments"] = arguments
            try:
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await asyncio.wait_for(self._writer.drain(), self.timeout)
            except TimeoutError:
                raise QMPError(f"QMP socket {self.path}: send timed out") from None
            except OSError as e:
                raise QMPError(f"QMP socket {self.path}: {e.strerror or e}") from None
            while True:
                answer = await self._read()
                if "event" in answer:
                    continue  # asynchronous events: bitmig polls, it needs none
                if answer.get("id") != ident:
                    continue  # an answer to a command of an earlier, timed-out call
                if "error" in answer:
                    err = answer["error"] if isinstance(answer["error"], dict) else {}
                    cls = str(err.get("class", "GenericError"))
                    desc = str(err.get("desc", "unknown error"))
                    raise QMPError(f"QMP {command}: {desc} ({cls})", cls)
                if "return" not in answer:
                    raise QMPError(f"QMP {command}: malformed answer {str(answer)[:200]}")
                return answer["return"]

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass
