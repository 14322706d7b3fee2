"""Issue 9 items 1 and 2: one name rule at every entry point; no two (node, name) pairs
share a stored file; one bitmap that cannot be stored never stops the others."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from wire import frames_of

import bitmig.core.store as store_mod
from bitmig.core.digest import tree_digest
from bitmig.core.store import Store, StoredMeta, StoreError, file_name, legacy_file_name
from bitmig.daemon.control import call, handle_request
from bitmig.daemon.migration import MigrationOptions
from bitmig.daemon.registry import RegistryError
from bitmig.daemon.service import Daemon
from bitmig.protocol import spec
from bitmig.protocol.codec import encode_bytes
from bitmig.protocol.events import Error, Hello, Ready, Start

# The pair: both were acknowledged, one file held them, one survived a restart.
PAIR_A = ("colR\0x", "y")
PAIR_B = ("colR", "x\0y")
GEOM = dict(disk_size=1 << 30, granularity=65536, chunk_size=64)


async def _frames_until(r: asyncio.StreamReader, buf: bytearray, n: int) -> list:
    """Read until at least n whole frames (or EOF); returns the frames decoded so far."""
    while len(frames_of(bytes(buf))) < n:
        data = await asyncio.wait_for(r.read(1 << 16), 20)
        if not data:
            break
        buf += data
    return frames_of(bytes(buf))


async def _session(port: int, starts: list[Start]) -> list:
    """Hello, wait for the destination's hello, send the starts; the frames it sends back
    until it has answered every start or closed."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    buf = bytearray()
    try:
        w.write(encode_bytes(Hello(1, 1, "source", spec.CAPABILITIES)))
        await _frames_until(r, buf, 1)
        w.write(b"".join(encode_bytes(s) for s in starts))
        return (await _frames_until(r, buf, 1 + len(starts)))[1:]
    finally:
        w.transport.abort()


def _raw_start(bid: int, node: str, name: str) -> Start:
    return Start(bid, node, name, GEOM["disk_size"], GEOM["granularity"], GEOM["chunk_size"])


@pytest.fixture
async def dest(tmp_path: Path):
    d = Daemon("destination", str(tmp_path / "d"), io_timeout=10, connect_timeout=10)
    _, port = await d.listen("127.0.0.1", 0)
    yield d, port
    await d.close()


async def test_one_connection_two_starts_of_a_colliding_pair(dest) -> None:
    d, port = dest
    got = await _session(port, [_raw_start(0, *PAIR_A), _raw_start(1, *PAIR_B)])
    assert got and type(got[0]) is Error, got
    assert got[0].code == "bad_field" and "NUL" in got[0].message, got[0]
    assert not any(type(f) is Ready for f in got)
    assert not list(d.store.dir.iterdir())  # not even a temp file


async def test_distinct_pairs_always_have_distinct_files(tmp_path: Path) -> None:
    # What the old encoding mapped to one file, and pairs that differ only in the split.
    pairs = [("a", "bc"), ("ab", "c"), ("a\x01", "b"), ("a", "\x01b"), ("n", "b"), ("nb", "")]
    assert len({file_name(n, b) for n, b in pairs}) == len(pairs)
    assert legacy_file_name(*PAIR_A) == legacy_file_name(*PAIR_B)  # the bug, recorded
    assert file_name(*PAIR_A) != file_name(*PAIR_B)


def _meta(node: str, name: str, bm, **kw) -> StoredMeta:
    return StoredMeta(node=node, name=name, disk_size=bm.disk_size, granularity=bm.granularity,
                      chunk_size=bm.chunk_size, enabled=True, persistent=False,
                      count=bm.count(), digest=tree_digest(bm.words.data), stored_at=0.0,
                      origin="local", **kw)


def _bitmap(seed: int):
    from bitmig.core.bitmap import DirtyBitmap

    bm = DirtyBitmap(1 << 30, 65536, 64)
    bm.fill_random(0.3, np.random.default_rng(seed))
    return bm


def test_store_detects_a_shared_file_on_save_and_on_load(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    st = Store(tmp_path)
    a, b = _bitmap(1), _bitmap(2)
    st.save(_meta("n", "a", a), a)
    # A file copied under another pair's name is refused, never loaded as that pair.
    (st.dir / file_name("n", "other")).write_bytes(st.path("n", "a").read_bytes())
    good, bad = st.load_all()
    assert [(m.node, m.name) for m, _ in good] == [("n", "a")]
    assert len(bad) == 1 and "header names 'n'/'a'" in bad[0], bad
    (st.dir / file_name("n", "other")).unlink()
    # Should two pairs ever hash alike, storing the second refuses instead of replacing.
    monkeypatch.setattr(store_mod, "file_name", lambda node, name: "same.bitmap")
    st2 = Store(tmp_path / "s2")
    st2.save(_meta("n", "a", a), a)
    with pytest.raises(StoreError, match="holds 'n'/'a'"):
        st2.save(_meta("n", "b", b), b)
    assert not [p for p in st2.dir.iterdir() if store_mod.TMP_MARK in p.name]
    monkeypatch.undo()


def test_store_refuses_bad_names(tmp_path: Path) -> None:
    st = Store(tmp_path)
    bm = _bitmap(3)
    for node, name, why in [(*PAIR_A, "NUL"), ("n", "x" * 1024, "1024 bytes"),
                            ("n", "", "0 bytes"), ("n", "\ud800", "UTF-8")]:
        with pytest.raises(StoreError, match=why):
            st.save(_meta(node, name, bm), bm)
    assert not list(st.dir.iterdir())


def test_legacy_files_are_read_and_rewritten(tmp_path: Path) -> None:
    st = Store(tmp_path)
    bm = _bitmap(4)
    path = st.save(_meta("n", "old", bm), bm)
    data = bytearray(path.read_bytes())
    data[7] = 1  # format version 1, under its version 1 name
    path.unlink()
    (st.dir / legacy_file_name("n", "old")).write_bytes(data)
    good, bad = Store(tmp_path).load_all()
    assert not bad and [(m.node, m.name) for m, _ in good] == [("n", "old")]
    assert good[0][1].sha256() == bm.sha256()
    assert [p.name for p in st.dir.iterdir()] == [file_name("n", "old")]
    assert Store.format_version(st.path("n", "old")) == store_mod.FORMAT_VERSION
    data[7] = 9  # a version this code does not know is refused, and says so
    (st.dir / "x.bitmap").write_bytes(data)
    _, bad = Store(tmp_path).load_all()
    assert len(bad) == 1 and "store format version 9" in bad[0], bad


async def test_dest_own_add_and_a_received_bitmap(dest) -> None:
    d, port = dest
    ans = await handle_request(d, (b'{"cmd": "add", "node": "colR\\u0000x", "name": "y", '
                                   b'"disk_size": 1073741824}'))
    assert ans["ok"] is False and ans["code"] == "bad_request" and "NUL" in ans["error"], ans
    got = await _session(port, [_raw_start(0, *PAIR_B)])
    assert type(got[0]) is Error and got[0].code == "bad_field", got
    # Names without NUL: the destination's own bitmap and a received one never share a file.
    await handle_request(d, b'{"cmd": "add", "node": "colR", "name": "xy", '
                            b'"disk_size": 1073741824, "fill": 0.2}')
    src = Daemon("source", options=MigrationOptions(small_threshold=0))
    e = src.registry.add("col", "Rxy", 1 << 30, 65536, 64)
    e.bitmap.fill_random(0.1, np.random.default_rng(5))
    result = await src.migrate("127.0.0.1", port)
    assert result.ok, result.error
    assert await d.close() == []
    good, bad = Store(d.store.dir.parent).load_all()
    assert not bad
    assert sorted((m.node, m.name) for m, _ in good) == [("col", "Rxy"), ("colR", "xy")]


def _source(state: Path, ctl: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "bitmig", "source", "--state-dir", str(state),
                          "--control", str(ctl)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # "control PATH" once the socket answers
    assert line.startswith("control"), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _stop(p: subprocess.Popen[str]) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return p.returncode, err


def test_source_state_dir_adds_sigterm_restart(tmp_path: Path) -> None:
    state, ctl = tmp_path / "s", tmp_path / "c.sock"
    p = _source(state, ctl)
    try:
        for node, name in (PAIR_A, PAIR_B):
            with pytest.raises(RegistryError, match="NUL") as ei:
                call(str(ctl), "add", node=node, name=name, disk_size="1G")
            assert ei.value.code == "bad_request"
        for node, name in (("colR", "x"), ("colRx", ""), ("colR", "xy")):
            if name:
                call(str(ctl), "add", node=node, name=name, disk_size="1G", fill=0.1)
    finally:
        rc, err = _stop(p)
    assert rc == 0, err
    p = _source(state, ctl)
    try:
        listed = sorted((b["node"], b["name"]) for b in call(str(ctl), "list"))
    finally:
        _stop(p)
    assert listed == [("colR", "x"), ("colR", "xy")]


def test_one_unstorable_bitmap_never_stops_the_others(tmp_path: Path) -> None:
    state, ctl = tmp_path / "s", tmp_path / "c.sock"
    p = _source(state, ctl)
    try:
        with pytest.raises(RegistryError, match="5000 bytes") as ei:
            call(str(ctl), "add", node="n", name="x" * 5000, disk_size="1G")
        assert ei.value.code == "bad_request"
        for name in ("good1", "blocked", "good2"):
            call(str(ctl), "add", node="n", name=name, disk_size="1G", fill=0.1)
        # The state directory refuses one file (a directory sits where it goes).
        (state / "bitmaps" / file_name("n", "blocked")).mkdir()
    finally:
        rc, err = _stop(p)
    assert rc == 1, err
    assert "'n'/'blocked'" in err and "good1" not in err and "good2" not in err, err
    (state / "bitmaps" / file_name("n", "blocked")).rmdir()
    p = _source(state, ctl)
    try:
        listed = sorted(b["name"] for b in call(str(ctl), "list"))
    finally:
        _stop(p)
    assert listed == ["good1", "good2"]


async def test_persist_stores_the_others_and_reports_the_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Daemon("source", str(tmp_path / "s"))
    for name in ("a", "bad", "c"):
        d.registry.add("n", name, 1 << 30, 65536, 64).bitmap.fill_random(
            0.2, np.random.default_rng(len(name)))
    real = Store.save

    def save(self, meta, bm):
        if meta.name == "bad":
            raise StoreError("disk full (test)")
        return real(self, meta, bm)

    monkeypatch.setattr(Store, "save", save)
    failed = await d.close()
    assert len(failed) == 1 and "'n'/'bad'" in failed[0] and "disk full" in failed[0]
    good, _ = Store(tmp_path / "s").load_all()
    assert sorted(m.name for m, _ in good) == ["a", "c"]
