"""The bitmaps a daemon owns, their ownership state, and mutations held during a freeze."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bitmig.core import defaults
from bitmig.core.bitmap import ChangeTracker, DirtyBitmap
from bitmig.protocol.spec import name_problem


class Ownership(Enum):
    OWNED = "owned"  # this daemon owns the bitmap; mutations apply at once
    MIGRATING = "migrating"  # owned, and being streamed live; mutations still apply
    FROZEN = "frozen"  # completion window: mutations wait for the outcome
    HANDED_OFF = "handed_off"  # the destination acknowledged; it owns the bitmap now


class RegistryError(Exception):
    """A control request that cannot be done; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HandedOff(RegistryError):
    def __init__(self, key: str, owner: str) -> None:
        super().__init__("handed_off", f"bitmap {key} was handed off to {owner}; mutate it there")
        self.owner = owner


@dataclass
class Entry:
    node: str
    name: str
    bitmap: DirtyBitmap
    enabled: bool = True
    persistent: bool = False
    state: Ownership = Ownership.OWNED
    new_owner: str | None = None
    token: bytes | None = None  # resume token of this bitmap's migration, kept across retries
    unsaved: ChangeTracker | None = None  # chunks changed since the stored copy (None: no copy)
    held: list[tuple[str, int, int, asyncio.Future[int]]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.node}/{self.name}"

    def describe(self) -> dict[str, Any]:
        bm = self.bitmap
        return {
            "node": self.node,
            "name": self.name,
            "disk_size": bm.disk_size,
            "granularity": bm.granularity,
            "chunk_size": bm.chunk_size,
            "enabled": self.enabled,
            "persistent": self.persistent,
            "count": bm.count(),
            "serialized_size": bm.serialized_size,
            "state": self.state.value,
            "owner": self.new_owner,
        }


_OPS = ("set", "reset")


class Registry:
    """Bitmaps by (node, name)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], Entry] = {}

    def add(
        self,
        node: str,
        name: str,
        disk_size: int,
        granularity: int = defaults.GRANULARITY,
        chunk_size: int = defaults.CHUNK_SIZE,
        enabled: bool = True,
        persistent: bool = False,
        bitmap: DirtyBitmap | None = None,
    ) -> Entry:
        key = (node, name)
        old = self.entries.get(key)
        if old is not None and old.state is not Ownership.HANDED_OFF:
            raise RegistryError("exists", f"bitmap {node}/{name} already exists")
        problem = name_problem(node, "node") or name_problem(name, "name")
        if problem:  # the wire's rule: what cannot be migrated or stored is never owned
            raise RegistryError("bad_request", problem)
        try:
            bm = bitmap or DirtyBitmap(disk_size, granularity, chunk_size)
        except ValueError as e:
            raise RegistryError("bad_request", str(e)) from None
        entry = Entry(node, name, bm, enabled, persistent)
        self.entries[key] = entry
        return entry

    def get(self, node: str, name: str) -> Entry:
        try:
            return self.entries[(node, name)]
        except KeyError:
            raise RegistryError("not_found", f"no bitmap {node}/{name}") from None

    def remove(self, node: str, name: str) -> Entry:
        entry = self.get(node, name)
        if entry.state in (Ownership.MIGRATING, Ownership.FROZEN):
            raise RegistryError("busy", f"bitmap {entry.key} is being migrated")
        return self.entries.pop((node, name))

    def owned(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state is not Ownership.HANDED_OFF]

    async def mutate(self, node: str, name: str, op: str, offset: int, length: int) -> int:
        """Apply set/reset of a byte range; during a freeze, wait for the outcome first."""
        if op not in _OPS:
            raise RegistryError("bad_request", f"unknown operation {op!r}")
        entry = self.get(node, name)
        if entry.state is Ownership.HANDED_OFF:
            raise HandedOff(entry.key, entry.new_owner or "?")
        if entry.state is Ownership.FROZEN:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            entry.held.append((op, offset, length, fut))
            return await fut
        return self._apply(entry, op, offset, length)

    @staticmethod
    def _apply(entry: Entry, op: str, offset: int, length: int) -> int:
        try:
            if op == "set":
                return entry.bitmap.set(offset, length)
            return entry.bitmap.reset(offset, length)
        except ValueError as e:
            raise RegistryError("bad_request", str(e)) from None

    @staticmethod
    def freeze(entries: list[Entry]) -> None:
        for e in entries:
            e.state = Ownership.FROZEN

    def thaw(self, entry: Entry, handed_to: str | None) -> None:
        """End a freeze: hand off (held mutations refused, naming the new owner) or stay
        the owner (held mutations applied in the order they arrived)."""
        held, entry.held = entry.held, []
        if handed_to is not None:
            entry.state = Ownership.HANDED_OFF
            entry.new_owner = handed_to
            for _op, _off, _len, fut in held:
                if not fut.done():
                    fut.set_exception(HandedOff(entry.key, handed_to))
            return
        entry.state = Ownership.OWNED
        for op, off, length, fut in held:
            try:
                result = self._apply(entry, op, off, length)
            except RegistryError as e:
                if not fut.done():
                    fut.set_exception(e)
                continue
            if not fut.done():
                fut.set_result(result)
