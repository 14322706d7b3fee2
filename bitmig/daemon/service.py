"""A bitmig daemon: owns bitmaps, answers its control socket, migrates, and receives.

`bitmig source` and `bitmig dest` are the same daemon with different parts switched
on: a destination listens for migrations and stores what it receives under its state
directory; any daemon can migrate bitmaps it owns onward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import ssl as ssl_mod
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bitmig.core import defaults
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.store import Store, StoredMeta, StoreError
from bitmig.daemon import tls
from bitmig.daemon.migration import Migration, OnAttempt
from bitmig.daemon.receiver import Host, Receiver
from bitmig.daemon.registry import Entry, Ownership, Registry, RegistryError
from bitmig.daemon.spools import Spools
from bitmig.daemon.trace_writer import Trace
from bitmig.protocol.events import Start
from bitmig.protocol.spec import Role
from bitmig.session.destination import DiscardSpool, Intake, Note, Parked
from bitmig.session.source import MigrationOptions, MigrationResult
from bitmig.session.target import BitmapTarget

log = logging.getLogger("bitmig")


LOCAL = "local"  # StoredMeta.origin of bitmaps this daemon stored itself (not received)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_tcp_refusal(host: str) -> str:
    return (f"refusing to migrate to {host} in plain TCP (not loopback); give --tls-cert, "
            "--tls-key and --tls-ca, or pass --insecure to allow it")


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
        insecure: bool = False,
        max_connections: int = defaults.MAX_CONNECTIONS,
        max_connections_per_peer: int = defaults.MAX_CONNECTIONS_PER_PEER,
        target: BitmapTarget | None = None,
        max_bitmaps: int = defaults.MAX_HELD_BITMAPS,
    ) -> None:
        self.side = Role(side)  # a misspelt side fails here, not deep in a migration
        # Plain TCP to a non-loopback destination only when asked (--insecure), as the
        # destination's listen policy: migrate() refuses it otherwise.
        self.insecure = insecure
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.connections: Counter[str] = Counter()  # open incoming connections by peer address
        self.refused_connections: Counter[str] = Counter()  # by reason: total, per_peer
        self.connections_changed = asyncio.Event()  # set whenever either counter changes
        self.registry = Registry()
        self.trace = Trace(trace_path, self.side)
        self.options = options or MigrationOptions()
        self.memory_budget = memory_budget
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.target = target  # where received bitmaps are delivered besides the store
        self.errors: Counter[str] = Counter()
        self.migrations: list[MigrationResult] = []
        self.active_migration: Migration | None = None
        # Awaited after the freeze gate opens, right before a migration freezes its
        # bitmaps (a live QEMU source folds its last delta into the bitmap here).
        self.before_freeze: list[Callable[[], Awaitable[None]]] = []
        self.store = Store(state_dir) if state_dir else None
        # Admission of arriving bitmaps (budget, names, caps, parked ones): sans-IO.
        self.intake = Intake(memory_budget, max_bitmaps=max_bitmaps,
                             durable=self.store is not None)
        self.spools = Spools(self.store)
        self._expiry: asyncio.TimerHandle | None = None
        self.stored: dict[tuple[str, str], StoredMeta] = {}
        self.persist_failures: list[str] = []  # bitmaps the last persist could not store
        self._servers: list[asyncio.AbstractServer] = []
        self._handlers: set[asyncio.Task[None]] = set()  # accepted, being served
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

    # -- receiving ---------------------------------------------------------------------

    @property
    def budget_used(self) -> int:
        return self.intake.budget_used

    @property
    def reserved(self) -> set[tuple[str, str]]:
        """Names being received or parked."""
        return self.intake.reserved

    @property
    def partials(self) -> dict[tuple[str, str], Parked]:
        """Bitmaps parked for a resume, by name."""
        return self.intake.parked

    @property
    def resume_timeout(self) -> float:
        return self.intake.resume_timeout

    @resume_timeout.setter
    def resume_timeout(self, seconds: float) -> None:
        self.intake.resume_timeout = seconds

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        """A bitmap stored here by an earlier attempt of the same migration whose ack was
        lost: the source still owns it too. It may be replaced by this attempt as long as
        nothing changed it here since it arrived (its meta bitmap is clean)."""
        e = self.registry.entries.get((start.node, start.name))
        meta = self.stored.get((start.node, start.name))
        if (e is None or meta is None or start.token is None or meta.token != start.token
                or e.state is not Ownership.OWNED or e.bitmap.meta.count()):
            return None
        return e.bitmap

    def own(self, meta: StoredMeta, bm: DirtyBitmap, replace: bool) -> None:
        """A received bitmap, verified (and stored, with a state directory), is ours."""
        if not meta.stored_at:
            meta = dataclasses.replace(meta, stored_at=time.time())
        if replace:  # the rename replaced the stored file; now the registry entry
            self.registry.entries.pop((meta.node, meta.name), None)
        self._adopt(meta, bm)

    def unstore(self, node: str, name: str) -> None:
        """The target refused a bitmap already stored: no copy may look valid."""
        if self.store is not None:
            self.store.remove(node, name)
        self.stored.pop((node, name), None)

    def _arm_expiry(self) -> None:
        """One timer for the earliest expiry of a parked bitmap."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        when = self.intake.next_timer()
        if when is not None:
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, when - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        for a in self.intake.handle_timer(time.monotonic()):
            if type(a) is DiscardSpool:
                self.spools.discard(a.spool)
            elif type(a) is Note:
                self.trace.event(a.what, **a.fields)
        self._arm_expiry()

    def host(self) -> Host:
        """The parts of this daemon a receiver uses."""
        return Host(self.intake, _Stored(self), self.spools, self.own, self.unstore,
                    self._arm_expiry, self.count_error, self.trace, self.target,
                    self.io_timeout, self.connect_timeout)

    def count_error(self, code: str) -> None:
        self.errors[str(code)] += 1

    # -- serving ----------------------------------------------------------------------

    def _admit(self, addr: str) -> str | None:
        """Why a new connection from `addr` is refused (the cap it would pass), or None."""
        if sum(self.connections.values()) >= self.max_connections:
            return "total"
        if self.connections[addr] >= self.max_connections_per_peer:
            return "per_peer"
        return None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer = w.get_extra_info("peername")
            addr = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            reason = self._admit(addr)
            if reason is not None:
                # Over a cap: closed before TLS, a Receiver or any buffer of ours (a reset,
                # so no TIME_WAIT state is kept either). Counted, traced, not logged one
                # by one: a flood must not flood the log too.
                w.transport.abort()
                self.refused_connections[reason] += 1
                self.connections_changed.set()
                self.trace.event("refused", peer=addr, reason=reason)
                return
            self.connections[addr] += 1
            self.connections_changed.set()
            task = asyncio.current_task()
            if task is not None:  # always, inside start_server's handler task
                self._handlers.add(task)
            try:
                # TLS is started here, not by start_server, so that a failed handshake is
                # seen (logged, counted, traced) rather than dropped silently by asyncio.
                if self.server_ssl is not None and not await tls.accept(
                        w, self.server_ssl, self.connect_timeout, self.tls_refused):
                    return
                await Receiver(self.host(), r, w).run()
            finally:
                self.connections[addr] -= 1
                if self.connections[addr] <= 0:
                    del self.connections[addr]
                self.connections_changed.set()
                self._handlers.discard(task)

        # The read buffer limit bounds each connection's partly received input
        # (defaults.CONNECTION_MEMORY); the connection caps bound their number.
        server = await asyncio.start_server(handle, host, port, limit=defaults.READ_BUFFER)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        self.trace.event("listening", host=addr[0], port=addr[1])
        return addr[0], addr[1]

    async def connections_closed(self) -> None:
        """Return once every connection accepted so far has been served to its end: its
        bitmaps stored, parked or dropped, its budget released. Tests wait on this
        instead of polling the daemon's state."""
        while self._handlers:
            await asyncio.wait(set(self._handlers))

    def add_server(self, server: asyncio.AbstractServer) -> None:
        """Close `server` (the control socket, say) with this daemon."""
        self._servers.append(server)

    def tls_refused(self, peer: str, why: str) -> None:
        """A TLS handshake failed (tls.accept's report): counted and traced."""
        self.count_error("tls")
        self.trace.event("error", peer=peer, code="tls", message=why)
        self.trace.flush()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    def persist(self) -> int:
        """Store every bitmap this daemon still owns (at shutdown): bitmaps created here,
        mutated after they arrived, or kept after a failed migration survive a restart.
        Each is stored on its own: one that cannot be stored never stops the others (it is
        named in self.persist_failures). Returns the number stored."""
        self.persist_failures = []
        if self.store is None:
            return 0
        n = 0
        for e in self.registry.owned():
            try:
                n += self._persist_one(e)
            except (StoreError, OSError, ValueError) as err:
                self.persist_failures.append(f"{e.node!r}/{e.name!r}: {err}")
        return n

    def _persist_one(self, e: Entry) -> int:
        from bitmig.core.digest import tree_digest

        assert self.store is not None
        if e.unsaved is not None and not e.unsaved.flags.any():
            return 0  # the stored copy is current: nothing to write
        live = e.bitmap
        tracker = e.unsaved or live.add_tracker(live.chunk_words)
        e.unsaved = tracker
        tracker.flags[:] = False  # before the snapshot: a later change re-flags
        # One snapshot for digest and data: control clients may still be writing.
        bm = DirtyBitmap(live.disk_size, live.granularity, live.chunk_size,
                         words=live.words.copy())
        meta = StoredMeta(
            node=e.node, name=e.name, disk_size=bm.disk_size, granularity=bm.granularity,
            chunk_size=bm.chunk_size, enabled=e.enabled, persistent=e.persistent,
            count=bm.count(), digest=tree_digest(bm.words.data), stored_at=time.time(),
            origin=LOCAL, token=e.token or b"")
        try:
            self.store.save(meta, bm)
        except StoreError:
            tracker.flags[:] = True  # not stored: a later persist tries again
            raise
        self.stored[(e.node, e.name)] = meta
        return 1

    async def close(self) -> list[str]:
        """Stop serving and store what is owned; returns a message per bitmap that could
        not be stored (empty when all were)."""
        if self._expiry is not None:
            self._expiry.cancel()
        for s in self._servers:
            s.close()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except TimeoutError:
                pass
        await asyncio.to_thread(self.persist)
        for msg in self.persist_failures:
            log.error("could not store an owned bitmap at shutdown: %s", msg)
        self.trace.close()
        return list(self.persist_failures)

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
        on_attempt: OnAttempt | None = None,
    ) -> MigrationResult:
        """Migrate, retrying as the options say; returns the last attempt's result listing
        every bitmap. `on_attempt(result, retry_in)` sees each attempt as it ends."""
        if self.client_ssl is None and not self.insecure and not is_loopback(host):
            raise RegistryError("bad_request", plain_tcp_refusal(host))
        entries = self.select(keys)
        if not entries:
            raise RegistryError("bad_request", "no bitmaps to migrate")
        if self.active_migration is not None:
            raise RegistryError("busy", "a migration is already running")

        seen: list[MigrationResult] = []

        def attempt_done(r: MigrationResult, retry_in: float | None) -> None:
            seen.append(r)
            self.migrations.append(r)
            if on_attempt is not None:
                on_attempt(r, retry_in)

        m = Migration(self.registry, entries, host, port, options or self.options, self.trace,
                      progress, self.client_ssl, self.before_freeze, attempt_done)
        self.active_migration = m
        try:
            result = await m.run()
        finally:
            self.active_migration = None
        if not seen:
            self.migrations.append(result)  # ended before any attempt (e.g. not owned)
        if self.store is not None:  # what was handed onward is no longer ours to keep
            for b in result.bitmaps:
                if b.ok:
                    self.store.remove(b.node, b.name)
                    self.stored.pop((b.node, b.name), None)
        return result

    def release_freeze(self) -> bool:
        """Let the running migration freeze (it waits for this under wait_for_complete).
        Returns False when no migration is running."""
        m = self.active_migration
        if m is None:
            return False
        m.release()
        return True


class _Stored:
    """What a destination session may ask of the bitmaps this daemon owns or stored."""

    def __init__(self, d: Daemon) -> None:
        self._d = d

    def holds(self, node: str, name: str) -> bool:
        return self._d.holds(node, name)

    def replaceable(self, start: Start) -> DirtyBitmap | None:
        return self._d.replaceable(start)


def control_path_default(side: str) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"bitmig-{side}-{os.getuid()}.sock")
