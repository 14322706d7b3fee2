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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitmig.core import defaults
from bitmig.core.assembly import Assembly
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import Spool, Store, StoredMeta, StoreError
from bitmig.daemon import tls
from bitmig.daemon.migration import Migration, MigrationOptions, MigrationResult
from bitmig.daemon.receiver import Receiver
from bitmig.daemon.registry import Entry, Ownership, Registry, RegistryError
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.events import Start
from bitmig.protocol.spec import Role

log = logging.getLogger("bitmig")


@dataclass
class Partial:
    """What a destination keeps of a bitmap whose connection dropped, for a retry."""

    start: Start
    assembly: Assembly
    spool: Spool | None
    size: int
    timer: asyncio.TimerHandle


LOCAL = "local"  # StoredMeta.origin of bitmaps this daemon stored itself (not received)


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
        side: Role | str,
        state_dir: str | None = None,
        trace_path: str | None = None,
        options: MigrationOptions | None = None,
        memory_budget: int = defaults.MEMORY_BUDGET,
        io_timeout: float = defaults.IO_TIMEOUT,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        server_ssl: ssl_mod.SSLContext | None = None,
        client_ssl: ssl_mod.SSLContext | None = None,
    ) -> None:
        self.side = Role(side)  # a misspelt side fails here, not deep in a migration
        self.registry = Registry()
        self.trace = Trace(trace_path, self.side)
        self.options = options or MigrationOptions()
        self.memory_budget = memory_budget
        self.budget_used = 0
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.reserved: set[tuple[str, str]] = set()
        self.partials: dict[tuple[str, str], Partial] = {}
        self.resume_timeout = defaults.RESUME_TIMEOUT
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
        entry = self.registry.add(meta.node, meta.name, meta.disk_size, meta.granularity,
                                  meta.chunk_size, meta.enabled, meta.persistent, bitmap=bm)
        entry.unsaved = bm.add_tracker(bm.chunk_words)  # what changes here after storing
        entry.unsaved.flags[:] = False
        if meta.origin == LOCAL and meta.token:
            # Stored here at exit with a migration under way: a retry after a restart
            # must present the same token (a lost ack is then resolved, not refused).
            entry.token = meta.token
        return entry

    def holds(self, node: str, name: str) -> bool:
        """True when a bitmap of that name is owned here, stored here, or arriving."""
        e = self.registry.entries.get((node, name))
        return (
            (e is not None and e.state is not Ownership.HANDED_OFF)
            or (node, name) in self.reserved
            or (self.store is not None and self.store.exists(node, name))
        )

    # -- resume -----------------------------------------------------------------------

    def park(self, start: Start, asm: Assembly, spool: Spool | None, size: int) -> None:
        """Keep a dropped bitmap's chunks for a retry with the same token (its budget and
        its name stay taken) until resume_timeout passes."""
        key = (start.node, start.name)
        timer = asyncio.get_running_loop().call_later(self.resume_timeout, self._expire, key)
        self.partials[key] = Partial(start, asm, spool, size, timer)
        self.trace.event("parked", bitmap=f"{start.node}/{start.name}",
                         held_chunks=int(asm.received.sum()))

    def _expire(self, key: tuple[str, str]) -> None:
        p = self.partials.pop(key, None)
        if p is None:
            return
        p.timer.cancel()
        if p.spool is not None:
            p.spool.abort()
        self.release_budget(p.size)
        self.reserved.discard(key)
        self.trace.event("discarded", bitmap=f"{key[0]}/{key[1]}")

    def claim(self, start: Start) -> Partial | None:
        """The parked chunks of this bitmap, when the start is a retry of the same
        migration (same token, same geometry); a parked bitmap that does not match is
        discarded: a fresh start must not be mixed with another attempt's chunks."""
        key = (start.node, start.name)
        p = self.partials.get(key)
        if p is None:
            return None
        s = p.start
        if (start.token is None or start.token != s.token or
                (s.disk_size, s.granularity, s.chunk_size) !=
                (start.disk_size, start.granularity, start.chunk_size)):
            self._expire(key)
            return None
        del self.partials[key]
        p.timer.cancel()
        return p

    def replaceable(self, start: Start) -> Entry | None:
        """A bitmap stored here by an earlier attempt of the same migration whose ack was
        lost: the source still owns it too. It may be replaced by this attempt as long as
        nothing changed it here since it arrived (its meta bitmap is clean)."""
        e = self.registry.entries.get((start.node, start.name))
        meta = self.stored.get((start.node, start.name))
        if (e is None or meta is None or start.token is None or meta.token != start.token
                or e.state is not Ownership.OWNED or e.bitmap.meta.count()):
            return None
        return e

    def take_budget(self, n: int) -> bool:
        if self.budget_used + n > self.memory_budget:
            return False
        self.budget_used += n
        return True

    def release_budget(self, n: int) -> None:
        self.budget_used -= n

    def count_error(self, code: str) -> None:
        self.errors[str(code)] += 1

    async def commit(self, meta: StoredMeta, bm: DirtyBitmap, spool: Spool | None = None,
                     replace: bool = False) -> None:
        """Store a verified bitmap durably, then own it. Raises StoreError."""
        if spool is not None:
            await asyncio.to_thread(spool.commit, meta)
        elif self.store is not None:
            await asyncio.to_thread(self.store.save, meta, bm)
        if replace:  # the rename above replaced the stored file; now the registry entry
            self.registry.entries.pop((meta.node, meta.name), None)
        self._adopt(meta, bm)

    # -- serving ----------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            # TLS is started here, not by start_server, so that a failed handshake is
            # seen (logged, counted, traced) rather than dropped silently by asyncio.
            if self.server_ssl is not None and not await tls.accept(self, w, self.server_ssl):
                return
            await Receiver(self, r, w).run()

        server = await asyncio.start_server(handle, host, port, limit=4 << 20)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        self.trace.event("listening", host=addr[0], port=addr[1])
        return addr[0], addr[1]

    async def control(self, path: str) -> None:
        from bitmig.daemon.control import serve_control

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
        from bitmig.core.digest import tree_digest

        n = 0
        for e in self.registry.owned():
            if e.unsaved is not None and not e.unsaved.flags.any():
                continue  # the stored copy is current: nothing to write
            live = e.bitmap
            e.unsaved = e.unsaved or live.add_tracker(live.chunk_words)
            e.unsaved.flags[:] = False  # before the snapshot: a later change re-flags
            # One snapshot for digest and data: control clients may still be writing.
            bm = DirtyBitmap(live.disk_size, live.granularity, live.chunk_size,
                             words=live.words.copy())
            meta = StoredMeta(e.node, e.name, bm.disk_size, bm.granularity, bm.chunk_size,
                              e.enabled, e.persistent, bm.count(), tree_digest(bm.words.data),
                              time.time(), LOCAL, e.token or b"")
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
