"""Durable storage of bitmaps under a state directory: write temp, fsync, rename.

File format version 2 (one file per bitmap, `bitmaps/<key>.bitmap`, where key is the
first 32 hex digits of sha256(msgpack([node, name])): msgpack strings carry their length,
so no two distinct (node, name) pairs share a key unless sha256 collides, and a file whose
header names another pair than its file name says is refused anyway):

    offset 0     8 bytes   magic b"BITMIG\x00" + format version (one byte: 2)
    offset 8     4 bytes   header length H, little-endian
    offset 12    H bytes   msgpack map: node, name, disk_size, granularity, chunk_size,
                           enabled, persistent, count, digest (tree digest, 32 bytes),
                           stored_at (unix seconds), origin (the source's address, or
                           "local" when this daemon stored its own bitmap at exit),
                           token (the migration's resume token, possibly empty)
    offset 4096  the serialized bitmap (little-endian 64-bit words)

Version 1 files (same layout, named from sha256(node NUL name), which let two pairs share
a file) are read, checked and rewritten as version 2 when a daemon starts; any other
version is refused with a message naming it.

A file is only ever created under a temporary name and renamed into place after its
data and header are synced (fdatasync), and the directory is fsynced after the rename;
bitmaps committed together share the directory fsync (commit_batch). Loading
recomputes the tree digest: a file that does not match its header is never used.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from bitmig.core.bitmap import WORD, DirtyBitmap, serialized_size
from bitmig.core.digest import tree_digest
from bitmig.protocol.spec import name_problem

MAGIC_PREFIX = b"BITMIG\x00"
FORMAT_VERSION = 2
LEGACY_VERSION = 1  # read and rewritten as FORMAT_VERSION at start
MAGIC = MAGIC_PREFIX + bytes([FORMAT_VERSION])
DATA_OFFSET = 4096
SUFFIX = ".bitmap"
TMP_MARK = ".tmp-"


class StoreError(Exception):
    """The state directory cannot be written or holds a damaged file."""


@dataclass(frozen=True)
class StoredMeta:
    """A stored bitmap's header. Build it with keyword arguments: twelve fields in a row
    are easy to misorder."""

    node: str
    name: str
    disk_size: int
    granularity: int
    chunk_size: int
    enabled: bool
    persistent: bool
    count: int
    digest: bytes
    stored_at: float
    origin: str
    token: bytes = b""  # the migration's resume token (lets a retry replace this copy)


def file_name(node: str, name: str) -> str:
    """The file of (node, name): a hash of an unambiguous encoding of the pair."""
    key = msgpack.packb([node, name], use_bin_type=True)
    return hashlib.sha256(key).hexdigest()[:32] + SUFFIX


def legacy_file_name(node: str, name: str) -> str:
    """Format version 1's file name (ambiguous when a name holds NUL)."""
    return hashlib.sha256(f"{node}\0{name}".encode()).hexdigest()[:32] + SUFFIX


def check_names(node: str, name: str) -> None:
    """Raise StoreError unless both are valid names (the protocol's rule)."""
    problem = name_problem(node, "node") or name_problem(name, "name")
    if problem:
        raise StoreError(f"cannot store {node!r}/{name!r}: {problem}")


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` and any missing parents with mode 0700, whatever the umask (mkdir's
    mode is only ever narrowed by the umask; Path.mkdir(parents=True) would give parents
    the umask's default). Directories that already exist are left as they are."""
    p = Path(path)
    missing = []
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # created meanwhile by someone else: theirs, not ours to change
    return Path(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The bitmaps a daemon holds durably."""

    def __init__(self, root: str | os.PathLike[str], clean: bool = True) -> None:
        self.dir = Path(root) / "bitmaps"
        try:
            make_private_dir(self.dir)
        except OSError as e:
            raise StoreError(f"cannot create state directory {self.dir}: {e}") from e
        if not os.access(self.dir, os.W_OK):
            raise StoreError(f"state directory {self.dir} is not writable")
        # Temp files are attempts that never committed; a daemon starting on the directory
        # discards them (clean=False only inspects, e.g. beside a running daemon).
        self.removed_temps = self._remove_temps() if clean else 0
        self.writable = clean

    def _remove_temps(self) -> int:
        """Temp files are attempts that never committed: they are discarded at start."""
        n = 0
        for p in self.dir.iterdir():
            if TMP_MARK in p.name:
                p.unlink(missing_ok=True)
                n += 1
        return n

    def path(self, node: str, name: str) -> Path:
        return self.dir / file_name(node, name)

    def check_free(self, final: Path, node: str, name: str) -> None:
        """Raise StoreError when `final` holds another bitmap than (node, name): storing
        there would lose that one (cannot happen short of a sha256 collision)."""
        if not final.exists():
            return
        try:
            other = self.read_meta(final)
        except (StoreError, OSError):
            return  # a damaged file there is replaced, as before
        if (other.node, other.name) != (node, name):
            raise StoreError(f"cannot store {node!r}/{name!r}: {final.name} holds "
                             f"{other.node!r}/{other.name!r}")

    def exists(self, node: str, name: str) -> bool:
        return self.path(node, name).exists()

    def begin(self, node: str, name: str, size: int) -> Spool:
        """A temp file that receives a bitmap's data while it arrives (see Spool).
        Raises StoreError for a name that cannot be stored."""
        check_names(node, name)
        return Spool(self, self.path(node, name), size)

    def save(self, meta: StoredMeta, bitmap: DirtyBitmap) -> Path:
        """Write a whole bitmap atomically and durably. Raises StoreError."""
        spool = self.begin(meta.node, meta.name, bitmap.serialized_size)
        try:
            spool.write(0, memoryview(bitmap.words).cast("B"))
            return spool.commit(meta)
        except StoreError:
            spool.abort()
            raise

    def remove(self, node: str, name: str) -> None:
        self.path(node, name).unlink(missing_ok=True)
        _fsync_dir(self.dir)

    @staticmethod
    def format_version(path: Path) -> int:
        """The format version of a bitmap file. Raises StoreError for any other file."""
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
        if len(head) != len(MAGIC) or head[:-1] != MAGIC_PREFIX:
            raise StoreError(f"{path}: not a bitmig bitmap file")
        return head[-1]

    @staticmethod
    def read_meta(path: Path) -> StoredMeta:
        with open(path, "rb") as f:
            head = f.read(DATA_OFFSET)
        if head[: len(MAGIC_PREFIX)] != MAGIC_PREFIX or len(head) < 12:
            raise StoreError(f"{path}: not a bitmig bitmap file")
        version = head[len(MAGIC_PREFIX)]
        if version not in (FORMAT_VERSION, LEGACY_VERSION):
            raise StoreError(f"{path}: store format version {version}; this bitmig reads "
                             f"versions {LEGACY_VERSION} and {FORMAT_VERSION} (a newer bitmig "
                             "wrote it?)")
        n = int.from_bytes(head[8:12], "little")
        try:
            fields = msgpack.unpackb(head[12 : 12 + n], raw=False)
            if not isinstance(fields, dict):
                raise TypeError("header is not a map")
            return StoredMeta(**fields)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise StoreError(f"{path}: damaged header: {e}") from None

    def load(self, path: Path) -> tuple[StoredMeta, DirtyBitmap]:
        """Read a stored bitmap and check it against its digest and its file name."""
        meta = self.read_meta(path)
        problem = name_problem(meta.node, "node") or name_problem(meta.name, "name")
        if problem:
            raise StoreError(f"{path}: {problem}")
        legacy = self.format_version(path) == LEGACY_VERSION
        want = (legacy_file_name if legacy else file_name)(meta.node, meta.name)
        if path.name != want:  # renamed or copied by hand: it may shadow another bitmap
            raise StoreError(f"{path}: header names {meta.node!r}/{meta.name!r}, whose file "
                             f"is {want}")
        size = serialized_size(meta.disk_size, meta.granularity)
        if path.stat().st_size != DATA_OFFSET + size:
            raise StoreError(f"{path}: {path.stat().st_size - DATA_OFFSET} data bytes, header "
                             f"says {size}")
        words = np.fromfile(path, dtype=WORD, count=size // 8, offset=DATA_OFFSET)
        if tree_digest(words.data) != meta.digest:
            raise StoreError(f"{path}: data does not match its digest")
        bm = DirtyBitmap(meta.disk_size, meta.granularity, meta.chunk_size, words=words)
        if bm.count() != meta.count:
            raise StoreError(f"{path}: {bm.count()} bits set, header says {meta.count}")
        return meta, bm

    def load_all(self) -> tuple[list[tuple[StoredMeta, DirtyBitmap]], list[str]]:
        """Every valid stored bitmap, and a message per file that was refused. Version 1
        files are rewritten as the current version (unless this Store only inspects)."""
        good: list[tuple[StoredMeta, DirtyBitmap]] = []
        bad: list[str] = []
        seen: set[tuple[str, str]] = set()
        for p in sorted(self.dir.glob("*" + SUFFIX)):
            try:
                meta, bm = self.load(p)
                if (meta.node, meta.name) in seen:
                    raise StoreError(f"{p}: a second file for {meta.node!r}/{meta.name!r}")
                if self.format_version(p) == LEGACY_VERSION and self.writable:
                    self.save(meta, bm)  # under its version 2 name, then drop the old one
                    p.unlink()
                    _fsync_dir(self.dir)
            except (StoreError, OSError, ValueError) as e:
                bad.append(str(e))
                continue
            seen.add((meta.node, meta.name))
            good.append((meta, bm))
        return good, bad


class Spool:
    """A bitmap file under construction: data written as it arrives, synced in the
    background, committed by header + fsync + rename. Until commit it exists only under
    a temporary name, which no loader ever reads as a bitmap."""

    def __init__(self, store: Store, final: Path, size: int) -> None:
        self.final = final
        self.store = store
        self.dir = store.dir
        self.tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}")
        self.unsynced = 0
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self.fd, DATA_OFFSET + size)
            # The header's block is allocated now, so the background syncs make it
            # durable before the freeze: the header written at commit then overwrites it
            # in place, and the commit's fdatasync needs no journal commit for it.
            os.pwrite(self.fd, bytes(DATA_OFFSET), 0)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot create {self.tmp}: {e}") from e

    def write(self, offset: int, data: memoryview) -> None:
        """Write serialized bytes at `offset` of the bitmap data."""
        try:
            done = 0
            while done < data.nbytes:
                done += os.pwrite(self.fd, data[done : done + (64 << 20)],
                                  DATA_OFFSET + offset + done)
        except OSError as e:
            raise StoreError(f"cannot write {self.tmp}: {e}") from e
        self.unsynced += data.nbytes

    def sync(self) -> None:
        """Flush what was written so far (called from a worker thread during the stream,
        so the fsync inside the frozen window has little left to do)."""
        self.unsynced = 0
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise StoreError(f"cannot sync {self.tmp}: {e}") from e

    def commit(self, meta: StoredMeta) -> Path:
        """Store this spool durably as `meta`'s bitmap (a batch of one, see commit_batch).
        Raises StoreError; the temp file is gone then."""
        (out,) = commit_batch(self.store, [(self, meta)])
        if isinstance(out, StoreError):
            raise out
        return out

    def seal(self, meta: StoredMeta) -> None:
        """Check `meta` against this spool's file name and write the header. Raises
        StoreError (and removes the temp file)."""
        try:
            check_names(meta.node, meta.name)
            if self.final.name != file_name(meta.node, meta.name):
                raise StoreError(f"cannot store {meta.node!r}/{meta.name!r} as "
                                 f"{self.final.name}")
            header = msgpack.packb(meta.__dict__, use_bin_type=True)
            if 12 + len(header) > DATA_OFFSET:
                raise StoreError(f"cannot store {meta.node!r}/{meta.name!r}: header of "
                                 f"{len(header)} bytes is too large")
            self.store.check_free(self.final, meta.node, meta.name)
            head = MAGIC + len(header).to_bytes(4, "little") + header
            os.pwrite(self.fd, head.ljust(DATA_OFFSET, b"\0"), 0)
        except (StoreError, OSError) as e:
            self.abort()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot write the header of {self.tmp}: {e}") from e

    def flush(self) -> None:
        """Make data and header durable, then close. fdatasync is enough: it writes
        the metadata needed to read the data back (size, block allocation), and the file
        size was set when the spool was created; only timestamps are left out. Raises
        StoreError (and removes the temp file)."""
        try:
            os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot sync {self.tmp}: {e}") from e

    def publish(self) -> Path:
        """Rename the flushed temp file to its final name (durable once the directory
        is synced). Raises StoreError (and removes the temp file)."""
        try:
            os.rename(self.tmp, self.final)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot rename {self.tmp} to {self.final.name}: {e}") from e
        return self.final

    def close(self) -> None:
        """Close the descriptor, keep the temp file (a parked bitmap holds no descriptor)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reopen(self) -> None:
        """Open the temp file again after close()."""
        if self.fd >= 0:
            return
        try:
            self.fd = os.open(self.tmp, os.O_RDWR)
        except OSError as e:
            raise StoreError(f"cannot reopen {self.tmp}: {e}") from e

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


Outcome = Path | StoreError
Map = Callable[[Callable[[int], None], list[int]], Iterable[None]]


def _serial(fn: Callable[[int], None], xs: list[int]) -> list[None]:
    return [fn(x) for x in xs]


def commit_batch(store: Store, items: Sequence[tuple[Spool, StoredMeta]],
                 pmap: Map = _serial) -> list[Outcome]:
    """Commit several spools together (a group commit): every header, then all data
    flushes (`pmap` may run them concurrently: the daemon passes a thread pool's map, so
    the filesystem serves them with few journal commits), then every rename, then ONE
    fsync of the directory. Returns, per item in order, the stored file or the
    StoreError that failed that item alone; a failed item's temp file is removed.

    Crash safety is that of one commit: a file gets its final name only after its data
    and header are durable, and nothing is reported stored before the directory fsync
    that makes the renames durable. A crash leaves each bitmap's old file or its new."""
    out: list[Outcome | None] = [None] * len(items)
    finals: set[Path] = set()
    for i, (spool, meta) in enumerate(items):
        try:
            if spool.final in finals:  # two commits of one name at once: the first wins
                spool.abort()
                raise StoreError(f"cannot store {meta.node!r}/{meta.name!r}: stored twice "
                                 "in one batch")
            spool.seal(meta)
            finals.add(spool.final)
        except StoreError as e:
            out[i] = e

    def flush(i: int) -> None:
        try:
            items[i][0].flush()
        except StoreError as e:
            out[i] = e

    list(pmap(flush, [i for i in range(len(items)) if out[i] is None]))
    renamed: list[int] = []
    for i, (spool, _meta) in enumerate(items):
        if out[i] is None:
            try:
                out[i] = spool.publish()
                renamed.append(i)
            except StoreError as e:
                out[i] = e
    if renamed:
        try:
            _fsync_dir(store.dir)
        except OSError as e:
            # The renames may or may not survive a crash: none of them is reported stored,
            # and none stays (an unacknowledged copy would be a second owner).
            for i in renamed:
                out[i] = StoreError(f"cannot sync {store.dir}: {e}")
                items[i][0].final.unlink(missing_ok=True)
            try:
                _fsync_dir(store.dir)
            except OSError:
                pass  # best effort: the files are not acknowledged either way
    return [o if o is not None else StoreError("not committed") for o in out]
