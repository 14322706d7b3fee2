"""A bitmig daemon: owns bitmaps, answers its control socket, migrates, and receives.

`bitmig source` and `bitmig dest` are the same daemon with different parts switched
on: a destination listens for migrations and stores what it receives under its state
directory; any daemon can migrate bitmaps it owns onward.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl as ssl_mod
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitmig import defaults, tls
from bitmig.bitmap import DirtyBitmap
from bitmig.migration import Migration, MigrationOptions, MigrationResult
from bitmig.receiver import Receiver
from bitmig.registry import Entry, Ownership, Registry, RegistryError
from bitmig.store import Spool, Store, StoredMeta, StoreError
from bitmig.trace import Trace

log = logging.getLogger("bitmig")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    def __init__(
        self,
        side: str,
        state_dir: str | None = None,
        trace_path: str | None = None,
        options: MigrationOptions | None = None,
        memory_budget: int = defaults.MEMORY_BUDGET,
        io_timeout: float = defaults.IO_TIMEOUT,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        server_ssl: ssl_mod.SSLContext | None = None,
        client_ssl: ssl_mod.SSLContext | None = None,
    ) -> None:
        self.side = side
        self.registry = Registry()
        self.trace = Trace(trace_path, side)
        self.options = options or MigrationOptions()
        self.memory_budget = memory_budget
        self.budget_used = 0
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.reserved: set[tuple[str, str]] = set()
        self.errors: Counter[str] = Counter()
        self.migrations: list[MigrationResult] = []
        self.active_migration: Migration | None = None
        self.store = Store(state_dir) if state_dir else None
        self.stored: dict[tuple[str, str], StoredMeta] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._stopped = asyncio.Event()
        if self.store:
            good, bad = self.store.load_all()
            for meta, bm in good:
                self._adopt(meta, bm)
            for msg in bad:
                log.error("refused stored bitmap: %s", msg)

    # -- ownership -------------------------------------------------------------------

    def _adopt(self, meta: StoredMeta, bm: DirtyBitmap) -> Entry:
        self.stored[(meta.node, meta.name)] = meta
        return self.registry.add(meta.node, meta.name, meta.disk_size, meta.granularity,
                                 meta.chunk_size, meta.enabled, meta.persistent, bitmap=bm)

    def holds(self, node: str, name: str) -> bool:
        """True when a bitmap of that name is owned here, stored here, or arriving."""
        e = self.registry.entries.get((node, name))
        return (
            (e is not None and e.state is not Ownership.HANDED_OFF)
            or (node, name) in self.reserved
            or (self.store is not None and self.store.exists(node, name))
        )

    def take_budget(self, n: int) -> bool:
        if self.budget_used + n > self.memory_budget:
            return False
        self.budget_used += n
        return True

    def release_budget(self, n: int) -> None:
        self.budget_used -= n

    def count_error(self, code: str) -> None:
        self.errors[str(code)] += 1

    async def commit(self, meta: StoredMeta, bm: DirtyBitmap, spool: Spool | None = None) -> None:
        """Store a verified bitmap durably, then own it. Raises StoreError."""
        if spool is not None:
            await asyncio.to_thread(spool.commit, meta)
        elif self.store is not None:
            await asyncio.to_thread(self.store.save, meta, bm)
        self._adopt(meta, bm)

    # -- serving ----------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            # TLS is started here, not by start_server, so that a failed handshake is
            # seen (logged, counted, traced) rather than dropped silently by asyncio.
            if self.server_ssl is not None and not await tls.accept(self, w, self.server_ssl):
                return
            await Receiver(self, r, w).run()

        server = await asyncio.start_server(handle, host, port, limit=1 << 20)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        self.trace.event("listening", host=addr[0], port=addr[1])
        return addr[0], addr[1]

    async def control(self, path: str) -> None:
        from bitmig.control import serve_control

        server = await serve_control(self, path)
        self._servers.append(server)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    def persist(self) -> int:
        """Store every bitmap this daemon still owns (at shutdown): bitmaps created here,
        mutated after they arrived, or kept after a failed migration survive a restart.
        Returns the number stored."""
        if self.store is None:
            return 0
        from bitmig.digest import tree_digest

        n = 0
        for e in self.registry.owned():
            bm = e.bitmap
            meta = StoredMeta(e.node, e.name, bm.disk_size, bm.granularity, bm.chunk_size,
                              e.enabled, e.persistent, bm.count(), tree_digest(bm.words.data),
                              time.time(), "local")
            self.store.save(meta, bm)
            self.stored[(e.node, e.name)] = meta
            n += 1
        return n

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except TimeoutError:
                pass
        try:
            await asyncio.to_thread(self.persist)
        except StoreError as e:
            log.error("could not store owned bitmaps at shutdown: %s", e)
        self.trace.close()

    # -- migrating out ----------------------------------------------------------------

    def select(self, keys: list[tuple[str, str]] | None) -> list[Entry]:
        if keys is None:
            return [e for e in self.registry.owned() if e.state is Ownership.OWNED]
        return [self.registry.get(n, b) for n, b in keys]

    async def migrate(
        self,
        host: str,
        port: int,
        keys: list[tuple[str, str]] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        options: MigrationOptions | None = None,
    ) -> MigrationResult:
        entries = self.select(keys)
        if not entries:
            raise RegistryError("bad_request", "no bitmaps to migrate")
        if self.active_migration is not None:
            raise RegistryError("busy", "a migration is already running")
        m = Migration(self.registry, entries, host, port, options or self.options, self.trace,
                      progress, self.client_ssl)
        self.active_migration = m
        try:
            result = await m.run()
        finally:
            self.active_migration = None
        self.migrations.append(result)
        if self.store is not None:  # what was handed onward is no longer ours to keep
            for b in result.bitmaps:
                if b.ok:
                    self.store.remove(b.node, b.name)
                    self.stored.pop((b.node, b.name), None)
        return result


def control_path_default(side: str) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"bitmig-{side}-{os.getuid()}.sock")
