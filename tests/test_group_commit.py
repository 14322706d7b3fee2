"""Group commit: the bitmaps due together are stored with their data flushes side by side
and one directory fsync; each gets its own outcome (bitmig.core.store.commit_batch,
bitmig.daemon.spools.Spools)."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bitmig.core import store as st
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest
from bitmig.daemon import spools as sp_mod
from bitmig.daemon.service import Daemon
from bitmig.daemon.spools import Spools
from bitmig.session.source import MigrationOptions

DISK, GRAN, CHUNK = 1 << 34, 65536, 1024  # 32 KiB serialized


def bitmap(seed: int) -> DirtyBitmap:
    bm = DirtyBitmap(DISK, GRAN, CHUNK)
    bm.fill_random(0.2, np.random.default_rng(seed))
    return bm


def meta_of(name: str, bm: DirtyBitmap) -> st.StoredMeta:
    return st.StoredMeta(node="n", name=name, disk_size=DISK, granularity=GRAN,
                         chunk_size=CHUNK, enabled=True, persistent=True, count=bm.count(),
                         digest=tree_digest(bm.words.data), stored_at=0.0, origin="test")


def spool_of(store: st.Store, name: str, bm: DirtyBitmap) -> st.Spool:
    spool = store.begin("n", name, bm.serialized_size)
    spool.write(0, memoryview(bm.words).cast("B"))
    return spool


def loaded(store: st.Store) -> dict[str, str]:
    good, bad = store.load_all()
    assert not bad, bad
    return {m.name: m.digest.hex() for m, _ in good}


def no_temps(store: st.Store) -> bool:
    return not [p for p in store.dir.iterdir() if st.TMP_MARK in p.name]


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts fsync (the directory's) and fdatasync (the files') calls."""
    n = {"fsync": 0, "fdatasync": 0}
    for name in n:
        real = getattr(os, name)

        def counted(fd: int, real=real, name=name) -> None:
            n[name] += 1
            real(fd)
        monkeypatch.setattr(os, name, counted)
    return n


def test_batch_stores_all_with_one_directory_fsync(tmp_path: Path,
                                                   syncs: dict[str, int]) -> None:
    store = st.Store(tmp_path)
    bms = {f"b{i}": bitmap(i) for i in range(20)}
    items = [(spool_of(store, k, bm), meta_of(k, bm)) for k, bm in bms.items()]
    with ThreadPoolExecutor(8) as pool:
        outs = st.commit_batch(store, items, pool.map)
    assert all(isinstance(o, Path) for o in outs), outs
    assert syncs == {"fsync": 1, "fdatasync": 20}
    assert loaded(store) == {k: tree_digest(bm.words.data).hex() for k, bm in bms.items()}
    assert no_temps(store)


@pytest.mark.parametrize("fault", ["flush", "rename", "clash", "twice", "header"])
def test_one_bad_file_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  fault: str) -> None:
    store = st.Store(tmp_path)
    bms = {f"b{i}": bitmap(i) for i in range(6)}
    items = [(spool_of(store, k, bm), meta_of(k, bm)) for k, bm in bms.items()]
    bad = 3
    victim = items[bad][0]
    if fault == "flush":  # the disk fails this file's writeback
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if fd == victim.fd:
                raise OSError(5, "Input/output error")
            real(fd)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
    elif fault == "rename":
        real_rename = os.rename

        def rename(a, b) -> None:
            if Path(a) == victim.tmp:
                raise OSError(28, "No space left on device")
            real_rename(a, b)
        monkeypatch.setattr(os, "rename", rename)
    elif fault == "clash":  # its file holds another bitmap (as a sha256 collision would)
        other = bitmap(99)
        store.save(meta_of("other", other), other)
        os.rename(store.path("n", "other"), victim.final)
        clashing = victim.final.read_bytes()
    elif fault == "twice":  # a second commit of b1's name in the same batch
        items[bad][0].abort()
        victim = spool_of(store, "b1", bms["b1"])
        items[bad] = (victim, meta_of("b1", bms["b1"]))
    else:  # the header names another bitmap than the spool's file
        items[bad] = (victim, meta_of("elsewhere", bms["b3"]))
    with ThreadPoolExecutor(4) as pool:
        outs = st.commit_batch(store, items, pool.map)
    assert isinstance(outs[bad], st.StoreError), outs[bad]
    assert all(isinstance(o, Path) for i, o in enumerate(outs) if i != bad), outs
    want = {k: tree_digest(bm.words.data).hex() for k, bm in bms.items() if k != "b3"}
    if fault == "clash":  # not replaced (the loader refuses it: its name is not its own)
        assert victim.final.read_bytes() == clashing
        victim.final.unlink()
    assert loaded(store) == want
    assert not victim.tmp.exists() and no_temps(store)


def test_directory_fsync_failure_reports_none_stored(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = st.Store(tmp_path)
    items = [(spool_of(store, f"b{i}", bitmap(i)), meta_of(f"b{i}", bitmap(i)))
             for i in range(3)]

    def fsync_dir(path: Path) -> None:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(st, "_fsync_dir", fsync_dir)
    outs = st.commit_batch(store, items)
    assert all(isinstance(o, st.StoreError) and "cannot sync" in str(o) for o in outs)
    assert not list(store.dir.iterdir())  # no unacknowledged copy stays


async def test_commits_due_together_form_one_batch(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   syncs: dict[str, int]) -> None:
    store = st.Store(tmp_path)
    spools = Spools(store)
    batches: list[int] = []
    real = sp_mod.commit_batch

    def spy(store: st.Store, items, pmap=None):
        batches.append(len(items))
        return real(store, items, pmap) if pmap else real(store, items)
    monkeypatch.setattr(sp_mod, "commit_batch", spy)
    bms = {f"b{i}": bitmap(i) for i in range(12)}
    metas = {k: meta_of(k, bm) for k, bm in bms.items()}
    metas["b5"] = meta_of("elsewhere", bms["b5"])  # fails alone
    for h, (k, bm) in enumerate(bms.items()):
        if h != 7:  # b7 has no spool: the whole bitmap is written at commit
            spools.open(h, "n", k, bm.serialized_size, memoryview(bm.words).cast("B"))
    outs = await asyncio.gather(*(spools.commit(None if h == 7 else h, metas[k], bm)
                                  for h, (k, bm) in enumerate(bms.items())),
                                return_exceptions=True)
    assert batches == [12]  # one group commit for every completion due at once
    assert syncs["fsync"] == 1
    assert isinstance(outs[5], st.StoreError)
    assert all(isinstance(o, st.StoredMeta) and o.stored_at > 0
               for i, o in enumerate(outs) if i != 5), outs
    assert loaded(store) == {k: tree_digest(bm.words.data).hex() for k, bm in bms.items()
                             if k != "b5"}
    assert no_temps(store) and not spools.files


async def test_commits_due_meanwhile_form_the_next_batch(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """While a batch syncs, the commits that come due wait and go together next."""
    store = st.Store(tmp_path)
    spools = Spools(store)
    batches: list[int] = []
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    real = sp_mod.commit_batch

    def slow(store: st.Store, items, pmap=None):
        batches.append(len(items))
        if len(batches) == 1:  # hold the first batch until the others are due
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
        return real(store, items)

    class Due(list):  # releases the first batch once the other seven commits are due
        def append(self, item) -> None:
            super().append(item)
            if len(self) == 7:
                release.set()
    monkeypatch.setattr(sp_mod, "commit_batch", slow)
    bms = {f"b{i}": bitmap(i) for i in range(8)}
    for h, (k, bm) in enumerate(bms.items()):
        spools.open(h, "n", k, bm.serialized_size, memoryview(bm.words).cast("B"))
    first = asyncio.create_task(spools.commit(0, meta_of("b0", bms["b0"]), bms["b0"]))
    await asyncio.wait_for(started.wait(), 30)  # the first batch runs in its thread
    spools.due = Due(spools.due)
    rest = [asyncio.create_task(spools.commit(h, meta_of(k, bm), bm))
            for h, (k, bm) in enumerate(bms.items()) if h]
    await asyncio.gather(first, *rest)
    assert batches == [1, 7]
    assert len(loaded(store)) == 8


async def test_a_migration_commits_its_bitmaps_in_groups(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver reads on while a commit runs, so the completions that arrive meanwhile
    join the next group: the first batch is held until every bitmap's commit is due (with
    commits carried out one after the other, they never would be)."""

    n = 10
    due = 0
    all_due = threading.Event()
    real_commit, real_batch = Spools.commit, sp_mod.commit_batch
    batches: list[int] = []

    async def commit(self: Spools, *a):
        nonlocal due
        due += 1
        if due == n:
            all_due.set()
        return await real_commit(self, *a)

    def batch(store: st.Store, items, pmap=None):
        batches.append(len(items))
        if len(batches) == 1:
            assert all_due.wait(60), "the receiver waited for one commit before the next"
        return real_batch(store, items, pmap) if pmap else real_batch(store, items)
    monkeypatch.setattr(Spools, "commit", commit)
    monkeypatch.setattr(sp_mod, "commit_batch", batch)
    dest = Daemon("destination", str(tmp_path / "state"))
    _, port = await dest.listen("127.0.0.1", 0)
    src = Daemon("source")
    for i in range(n):
        e = src.registry.add("n", f"b{i}", DISK, GRAN, CHUNK)
        e.bitmap.fill_random(0.2, np.random.default_rng(i))
    # Every bitmap live (none under the small threshold): they freeze together, so all
    # their completions arrive in one burst (small ones would complete in groups).
    result = await src.migrate("127.0.0.1", port, options=MigrationOptions(small_threshold=0))
    assert result.ok, result.error
    await dest.close()
    assert sum(batches) == n and len(batches) < n
    assert loaded(st.Store(tmp_path / "state")) == {b.name: b.digest for b in result.bitmaps}
