"""Persistent dirty bitmaps in qcow2 images: read them from any image (read-only), and
write a fresh, minimal image of our own that holds given bitmaps.

Format (QEMU's docs/interop/qcow2.txt, block/qcow2-bitmap.c); every number big-endian:

- header: magic "QFI\\xfb", version 2 or 3, cluster_bits, size (virtual), ...; version 3
  adds the feature bit fields, refcount_order and header_length. Header extensions follow
  the header inside the first cluster: (type u32, length u32, data padded to 8 bytes),
  ending with type 0.
- bitmaps extension 0x23852875 (24 bytes): nb_bitmaps u32, reserved u32 (zero),
  bitmap_directory_size u64, bitmap_directory_offset u64 (cluster aligned). It is only
  consistent while autoclear feature bit 0 is set: a program that does not know bitmaps
  clears unknown autoclear bits when it writes the image, so QEMU then ignores every
  bitmap. We refuse such an image with a clear error instead of reading stale bits.
- directory entry (padded to 8 bytes): bitmap_table_offset u64, bitmap_table_size u32,
  flags u32 (bit 0 in_use, bit 1 auto = enabled, others reserved), type u8 (1),
  granularity_bits u8 (9..31), name_size u16 (<= 1023), extra_data_size u32 (QEMU
  supports 0 only), then the name (not NUL-terminated).
- bitmap table: one u64 per cluster of serialized bitmap; bits 9..55 the data cluster's
  offset; offset 0 means all zeroes, or all ones when bit 0 is set.
- the serialized bitmap is the bitmap's 64-bit little-endian words, bit k covering disk
  bytes [k*g, (k+1)*g) LSB first: bitmig's own in-memory form (bitmig.core.bitmap), so
  reading is a copy of clusters into the word array and no bit is shuffled.

While QEMU has an image open read-write its bitmaps on disk are stale and flagged
in_use; reading one of those is refused (BitmapInUseError).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitmig.core.bitmap import ALL_ONES, WORD, DirtyBitmap, alloc_words
from bitmig.core.defaults import CHUNK_SIZE

QCOW2_MAGIC = b"QFI\xfb"
BITMAPS_EXT = 0x23852875
AUTOCLEAR_BITMAPS = 1 << 0
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_KNOWN = 0x1F  # dirty, corrupt, external data file, compression type, extended L2

# QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c)
MAX_BITMAPS = 65535
MAX_NAME_BYTES = 1023
MIN_GRANULARITY = 1 << 9
MAX_GRANULARITY = 1 << 31
MAX_TABLE_SIZE = 0x8000000  # entries of one bitmap table
MAX_PHYS_SIZE = 0x20000000  # bytes of one serialized bitmap on disk (512 MiB)
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1
BITMAP_TYPE_DIRTY = 1

SECTOR = 512
HEADER_V3 = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # 104 bytes, up to header_length
HEADER_V2_LEN = 72
EXT = struct.Struct(">II")
BITMAPS_EXT_DATA = struct.Struct(">IIQQ")
DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data, then name

WRITE_CLUSTER_BITS = 16  # 64 KiB clusters, qemu-img create's default


class Qcow2Error(Exception):
    """An image or bitmap that cannot be read or written; the message says why."""


class NotQcow2Error(Qcow2Error):
    """The file is not a qcow2 image (or a version without bitmaps)."""


class InconsistentError(Qcow2Error):
    """The bitmaps extension, directory or a bitmap table breaks the format's rules."""


class BitmapInUseError(Qcow2Error):
    """A bitmap flagged in_use: QEMU has (or had, and crashed) the image open; its bits
    on disk are stale."""


class BitmapNotFoundError(Qcow2Error):
    """A bitmap asked for by name is not in the image."""


class LimitError(Qcow2Error):
    """A bitmap that qcow2 (QEMU) cannot hold: name, granularity, size, count."""


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry (no bits)."""

    name: str
    granularity: int
    enabled: bool  # the auto flag: QEMU records writes into it when the image is open
    in_use: bool
    table_offset: int
    table_size: int


@dataclass(frozen=True)
class ImageHeader:
    """What read_header learned of an image."""

    path: str
    version: int
    cluster_size: int
    virtual_size: int  # as QEMU sees it: the header's size rounded down to 512 bytes
    file_size: int
    incompatible_features: int
    autoclear_features: int
    bitmaps: tuple[BitmapEntry, ...]

    def find(self, name: str) -> BitmapEntry | None:
        for b in self.bitmaps:
            if b.name == name:
                return b
        return None


@dataclass(eq=False)
class ImageBitmap:
    """A persistent bitmap with its bits: `words` in bitmig's serialized form (little-
    endian u64, the last word zero-padded), as many as the image's virtual size needs."""

    name: str
    granularity: int
    enabled: bool
    in_use: bool
    words: np.ndarray

    def sha256(self) -> bytes:
        """Equals QEMU's x-debug-block-dirty-bitmap-sha256 of the same bitmap."""
        return hashlib.sha256(self.words.data).digest()

    def count(self) -> int:
        return int(np.bitwise_count(self.words).sum())

    def to_dirty_bitmap(self, disk_size: int, chunk_size: int = CHUNK_SIZE) -> DirtyBitmap:
        """A DirtyBitmap sharing this bitmap's words (no copy)."""
        return DirtyBitmap(disk_size, self.granularity, chunk_size, words=self.words)


def bitmap_words(virtual_size: int, granularity: int) -> int:
    """64-bit words of a bitmap of an image of `virtual_size` bytes."""
    nbits = -(-virtual_size // granularity)
    return -(-nbits // 64)


def check_bitmap_limits(
    virtual_size: int, granularity: int, name: str, cluster_size: int = 1 << WRITE_CLUSTER_BITS
) -> None:
    """Raise LimitError if qcow2 cannot hold this bitmap (QEMU's own constraints)."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise LimitError("bitmap name must not be empty")
    if len(raw) > MAX_NAME_BYTES:
        raise LimitError(
            f"bitmap name of {len(raw)} bytes exceeds qcow2's limit of {MAX_NAME_BYTES}"
        )
    if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
        raise LimitError(
            f"granularity {granularity} is not a power of two in "
            f"[{MIN_GRANULARITY}, {MAX_GRANULARITY}] (qcow2's limits)"
        )
    nbytes = bitmap_words(virtual_size, granularity) * 8
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        raise LimitError(
            f"bitmap of {nbytes} bytes (disk {virtual_size} B at granularity {granularity} B)"
            f" exceeds qcow2's limit of {MAX_PHYS_SIZE} bytes; use a larger granularity"
        )


# -- reading ----------------------------------------------------------------------------


def _pread(fd: int, size: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise InconsistentError(f"{what} at offset {offset} lies past the end of the file")
    return data


def _open(path: str | os.PathLike[str]) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Qcow2Error(f"{path}: no such image") from None
    except IsADirectoryError:
        raise NotQcow2Error(f"{path}: is a directory, not a qcow2 image") from None
    except OSError as e:
        raise Qcow2Error(f"{path}: cannot open: {e.strerror}") from None


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Parse and validate an image's header, bitmaps extension and bitmap directory."""
    fd = _open(path)
    try:
        return _read_header(fd, str(path))
    finally:
        os.close(fd)


def _read_header(fd: int, path: str) -> ImageHeader:
    try:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER_V3.size, 0)
    except OSError as e:
        raise Qcow2Error(f"{path}: cannot read: {e.strerror}") from None
    if len(head) < HEADER_V2_LEN or head[:4] != QCOW2_MAGIC:
        raise NotQcow2Error(f"{path}: not a qcow2 image (no QFI\\xfb magic)")
    version, cluster_bits, size = struct.unpack_from(">I", head, 4)[0], *struct.unpack_from(
        ">IQ", head, 20
    )
    if version not in (2, 3):
        raise NotQcow2Error(f"{path}: qcow2 version {version} is not supported (2 or 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InconsistentError(f"{path}: cluster_bits {cluster_bits} outside [9, 21]")
    cluster_size = 1 << cluster_bits
    backing_offset = struct.unpack_from(">Q", head, 8)[0]
    if version == 2:
        incompat = autoclear = 0
        header_length = HEADER_V2_LEN
    else:
        if len(head) < HEADER_V3.size:
            raise InconsistentError(f"{path}: truncated version 3 header")
        f = HEADER_V3.unpack(head)
        incompat, autoclear, header_length = f[13], f[15], f[17]
        if header_length < HEADER_V3.size or header_length > cluster_size:
            raise InconsistentError(f"{path}: header_length {header_length} is invalid")
    if incompat & INCOMPAT_CORRUPT:
        raise Qcow2Error(f"{path}: image is marked corrupt; repair it with qemu-img check -r")
    if incompat & ~INCOMPAT_KNOWN:
        raise Qcow2Error(f"{path}: unknown incompatible features {incompat:#x}")

    # Extensions live between the header and the backing file name (or cluster end).
    ext_end = min(backing_offset or cluster_size, cluster_size)
    region = os.pread(fd, max(0, ext_end - header_length), header_length)
    ext = None
    pos = 0
    while pos < len(region):
        if pos + EXT.size > len(region):
            raise InconsistentError(f"{path}: truncated header extension")
        typ, length = EXT.unpack_from(region, pos)
        pos += EXT.size
        if length > len(region) - pos:
            raise InconsistentError(f"{path}: header extension {typ:#x} too large")
        if typ == 0:
            break
        if typ == BITMAPS_EXT:
            if ext is not None:
                raise InconsistentError(f"{path}: two bitmaps extensions")
            if length != BITMAPS_EXT_DATA.size:
                raise InconsistentError(f"{path}: bitmaps extension of {length} bytes, not 24")
            ext = BITMAPS_EXT_DATA.unpack_from(region, pos)
        pos += (length + 7) & ~7

    bitmaps: tuple[BitmapEntry, ...] = ()
    virtual_size = size - size % SECTOR
    if ext is not None:
        if not autoclear & AUTOCLEAR_BITMAPS:
            raise InconsistentError(
                f"{path}: the bitmaps extension is inconsistent (autoclear bit 0 is clear: a "
                "program without bitmap support wrote the image); QEMU ignores its bitmaps"
            )
        bitmaps = _read_directory(fd, path, ext, cluster_size, file_size, virtual_size)
    # autoclear bit 0 without the extension: no bitmaps, as QEMU sees it.
    return ImageHeader(
        path=path,
        version=version,
        cluster_size=cluster_size,
        virtual_size=virtual_size,
        file_size=file_size,
        incompatible_features=incompat,
        autoclear_features=autoclear,
        bitmaps=bitmaps,
    )


def _read_directory(
    fd: int,
    path: str,
    ext: tuple[int, int, int, int],
    cluster_size: int,
    file_size: int,
    virtual_size: int,
) -> tuple[BitmapEntry, ...]:
    nb, reserved, dir_size, dir_offset = ext
    if reserved:
        raise InconsistentError(f"{path}: bitmaps extension reserved field is not zero")
    if not 1 <= nb <= MAX_BITMAPS:
        raise InconsistentError(f"{path}: bitmaps extension counts {nb} bitmaps")
    if dir_offset % cluster_size or dir_offset == 0:
        raise InconsistentError(f"{path}: bitmap directory offset {dir_offset} not aligned")
    if not 0 < dir_size <= MAX_DIRECTORY_SIZE or dir_offset + dir_size > file_size:
        raise InconsistentError(
            f"{path}: bitmap directory of {dir_size} bytes at {dir_offset} does not fit"
        )
    data = _pread(fd, dir_size, dir_offset, "bitmap directory")
    entries: list[BitmapEntry] = []
    names: set[str] = set()
    pos = 0
    while pos < dir_size:
        if pos + DIR_ENTRY.size > dir_size:
            raise InconsistentError(f"{path}: broken bitmap directory")
        if len(entries) == nb:
            raise InconsistentError(f"{path}: more bitmaps in the directory than the {nb} "
                                    "the extension counts")
        t_off, t_size, flags, typ, gbits, name_size, extra = DIR_ENTRY.unpack_from(data, pos)
        start = pos + DIR_ENTRY.size
        pos += (DIR_ENTRY.size + extra + name_size + 7) & ~7
        if pos > dir_size:
            raise InconsistentError(f"{path}: broken bitmap directory")
        raw = data[start + extra : start + extra + name_size]
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InconsistentError(f"{path}: bitmap name {raw!r} is not UTF-8") from None
        if extra:
            raise InconsistentError(f"{path}: bitmap {name!r} has extra data (unsupported)")
        in_use = bool(flags & FLAG_IN_USE)
        bad = (
            t_size == 0
            or t_off == 0
            or t_off % cluster_size
            or t_size > MAX_TABLE_SIZE
            or not 9 <= gbits <= 31
            or flags & RESERVED_FLAGS
            or name_size > MAX_NAME_BYTES
            or name_size == 0
            or typ != BITMAP_TYPE_DIRTY
            or t_size * cluster_size > MAX_PHYS_SIZE
            or t_off + t_size * 8 > file_size
        )
        if not bad and not in_use:
            # QEMU loads a bitmap only if its table has exactly the clusters it needs.
            need = -(-bitmap_words(virtual_size, 1 << gbits) * 8 // cluster_size)
            bad = t_size != need
        if bad:
            raise InconsistentError(f"{path}: bitmap {name!r} breaks qcow2's constraints")
        if name in names:
            raise InconsistentError(f"{path}: two bitmaps named {name!r}")
        names.add(name)
        entries.append(BitmapEntry(name, 1 << gbits, bool(flags & FLAG_AUTO), in_use,
                                   t_off, t_size))
    if len(entries) != nb:
        raise InconsistentError(f"{path}: {len(entries)} bitmaps in the directory, the "
                                f"extension counts {nb}")
    return tuple(entries)


def read_bitmaps(
    path: str | os.PathLike[str], names: list[str] | None = None
) -> list[ImageBitmap]:
    """Every persistent bitmap of the image (or those named, in that order), with bits.

    Raises BitmapNotFoundError for a missing name, BitmapInUseError for a bitmap flagged
    in_use (its bits on disk are stale), InconsistentError for a broken extension.
    """
    fd = _open(path)
    try:
        header = _read_header(fd, str(path))
        if names is None:
            chosen = list(header.bitmaps)
        else:
            chosen = []
            for n in names:
                e = header.find(n)
                if e is None:
                    raise BitmapNotFoundError(f"{path}: no bitmap named {n!r}")
                chosen.append(e)
        for e in chosen:
            if e.in_use:
                raise BitmapInUseError(
                    f"{path}: bitmap {e.name!r} is in use (QEMU has the image open, or did "
                    "not close it cleanly); its bits on disk are stale"
                )
        return [_read_bits(fd, header, e) for e in chosen]
    finally:
        os.close(fd)


def _read_bits(fd: int, header: ImageHeader, e: BitmapEntry) -> ImageBitmap:
    cs = header.cluster_size
    nwords = bitmap_words(header.virtual_size, e.granularity)
    nbytes = nwords * 8
    table = np.frombuffer(
        _pread(fd, e.table_size * 8, e.table_offset, f"bitmap table of {e.name!r}"), dtype=">u8"
    ).astype(np.uint64)
    if np.any(table & np.uint64(ENTRY_RESERVED_MASK)):
        raise InconsistentError(f"{header.path}: bitmap {e.name!r}: reserved table bits set")
    offsets = table & np.uint64(ENTRY_OFFSET_MASK)
    has_data = offsets != 0
    if np.any(has_data & ((table & np.uint64(ENTRY_ALL_ONES)) != 0)):
        raise InconsistentError(f"{header.path}: bitmap {e.name!r}: data entry with bit 0 set")
    if np.any(offsets % np.uint64(cs)):
        raise InconsistentError(f"{header.path}: bitmap {e.name!r}: unaligned data cluster")
    # bytes of the serialized bitmap each table entry carries (the last one may be short)
    lengths = np.full(e.table_size, cs, dtype=np.uint64)
    lengths[-1] = nbytes - (e.table_size - 1) * cs
    if np.any(has_data & (offsets + lengths > np.uint64(header.file_size))):
        raise InconsistentError(
            f"{header.path}: bitmap {e.name!r}: data cluster past the end of the file"
        )

    words = alloc_words(nwords)
    buf = memoryview(words).cast("B")
    idx = np.flatnonzero(has_data)
    if idx.size:
        # one pread per run of clusters that are consecutive both in the table and the file
        off = offsets[idx]
        brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(off) != np.uint64(cs))) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [idx.size]))
        for s, t in zip(starts.tolist(), ends.tolist(), strict=True):
            a = int(idx[s]) * cs
            b = min(int(idx[t - 1]) * cs + cs, nbytes)
            got = os.preadv(fd, [buf[a:b]], int(off[s]))
            if got != b - a:
                raise InconsistentError(f"{header.path}: bitmap {e.name!r}: short read")
    for i in np.flatnonzero(~has_data & ((table & np.uint64(ENTRY_ALL_ONES)) != 0)).tolist():
        words[i * cs // 8 : min((i + 1) * cs, nbytes) // 8] = ALL_ONES
    nbits = -(-header.virtual_size // e.granularity)
    if nbits % 64:  # bits past the disk's end are not part of the bitmap
        words[-1] &= np.uint64((1 << (nbits % 64)) - 1)
    return ImageBitmap(e.name, e.granularity, e.enabled, False, words)


# -- writing ----------------------------------------------------------------------------


def write_bitmap_image(
    path: str | os.PathLike[str],
    virtual_size: int,
    bitmaps: list[ImageBitmap],
    *,
    sync: bool = False,
) -> None:
    """Create a fresh qcow2 image (no data clusters) of `virtual_size` bytes holding
    `bitmaps` as persistent bitmaps (flag auto = enabled). The file must not exist: this
    never writes over anything, least of all a user's image. Refcounts are exact, so
    `qemu-img check` reports the image clean. Raises LimitError for what qcow2 cannot
    hold; a partly written file is removed."""
    if virtual_size < SECTOR or virtual_size % SECTOR:
        raise LimitError(f"virtual size {virtual_size} must be a positive multiple of 512")
    if len(bitmaps) > MAX_BITMAPS:
        raise LimitError(f"{len(bitmaps)} bitmaps exceed qcow2's limit of {MAX_BITMAPS}")
    cb = WRITE_CLUSTER_BITS
    cs = 1 << cb
    cw = cs // 8
    seen: set[str] = set()
    for bm in bitmaps:
        check_bitmap_limits(virtual_size, bm.granularity, bm.name, cs)
        if bm.name in seen:
            raise LimitError(f"two bitmaps named {bm.name!r}")
        seen.add(bm.name)
        if bm.in_use:
            raise Qcow2Error(f"bitmap {bm.name!r} is flagged in_use; refusing to write it")
        nwords = bitmap_words(virtual_size, bm.granularity)
        if bm.words.dtype != WORD or bm.words.shape != (nwords,):
            raise LimitError(
                f"bitmap {bm.name!r}: {nwords} little-endian words expected for disk "
                f"{virtual_size} B at granularity {bm.granularity} B"
            )

    def clusters_for(nbytes: int) -> int:
        return -(-nbytes // cs)

    l1_size = -(-virtual_size // (cs * cw))
    l1_clusters = clusters_for(l1_size * 8)

    # Per bitmap: its table's entries and which clusters go to disk as data.
    directory = bytearray()
    dir_entries: list[tuple[int, ImageBitmap, np.ndarray]] = []
    entry_pos: list[int] = []
    for bm in bitmaps:
        nwords = bm.words.size
        tsize = clusters_for(nwords * 8)
        full = nwords // cw
        kinds = np.zeros(tsize, dtype=np.int8)  # 0 zeroes, 1 ones, 2 data
        if full:
            view = bm.words[: full * cw].reshape(full, cw)
            ors = np.bitwise_or.reduce(view, axis=1)
            ands = np.bitwise_and.reduce(view, axis=1)
            kinds[:full] = np.where(ands == ALL_ONES, 1, np.where(ors != 0, 2, 0))
        if full < tsize and np.any(bm.words[full * cw :]):
            kinds[full] = 2  # the short last cluster is written as data unless all zero
        dir_entries.append((tsize, bm, kinds))
        entry_pos.append(len(directory))
        raw = bm.name.encode("utf-8", "surrogateescape")
        entry = DIR_ENTRY.pack(0, tsize, FLAG_AUTO if bm.enabled else 0, BITMAP_TYPE_DIRTY,
                               bm.granularity.bit_length() - 1, len(raw), 0) + raw
        directory += entry + b"\0" * (-len(entry) % 8)

    bitmap_clusters = sum(clusters_for(t * 8) + int(np.count_nonzero(k == 2))
                          for t, _, k in dir_entries)
    dir_clusters = clusters_for(len(directory)) if bitmaps else 0
    fixed = 1 + l1_clusters + bitmap_clusters + dir_clusters
    per_block = cs * 8 // 16  # refcount_order 4: 16-bit refcounts
    rblocks, rtable = 1, 1
    while True:
        total = fixed + rtable + rblocks
        nb = -(-total // per_block)
        nt = clusters_for(nb * 8)
        if (nb, nt) == (rblocks, rtable):
            break
        rblocks, rtable = nb, nt

    # Layout: header | refcount table | refcount blocks | L1 | per bitmap: table, data |
    # directory.
    rt_off = cs
    rb_off = rt_off + rtable * cs
    l1_off = rb_off + rblocks * cs
    cur = l1_off + l1_clusters * cs
    pieces: list[tuple[int, memoryview | bytes]] = []
    for i, (tsize, bm, kinds) in enumerate(dir_entries):
        table_off = cur
        cur += clusters_for(tsize * 8) * cs
        table = np.zeros(tsize, dtype=">u8")
        table[kinds == 1] = ENTRY_ALL_ONES
        data_idx = np.flatnonzero(kinds == 2)
        table[data_idx] = cur + np.arange(data_idx.size, dtype=np.uint64) * np.uint64(cs)
        pieces.append((table_off, table.tobytes()))
        # write runs of consecutive data clusters straight from the caller's words
        if data_idx.size:
            brk = np.flatnonzero(np.diff(data_idx) != 1) + 1
            wbuf = memoryview(bm.words).cast("B")
            pos = cur
            for run in np.split(data_idx, brk):
                a, b = int(run[0]) * cs, min((int(run[-1]) + 1) * cs, bm.words.size * 8)
                pieces.append((pos, wbuf[a:b]))
                pos += run.size * cs
            cur += data_idx.size * cs
        struct.pack_into(">Q", directory, entry_pos[i], table_off)
    dir_off = cur if bitmaps else 0
    cur += dir_clusters * cs
    total_clusters = cur // cs
    assert total_clusters == total, (total_clusters, total)
    if bitmaps:
        pieces.append((dir_off, bytes(directory)))

    header = bytearray(cs)
    HEADER_V3.pack_into(
        header, 0, QCOW2_MAGIC, 3, 0, 0, cb, virtual_size, 0, l1_size, l1_off, rt_off, rtable,
        0, 0, 0, 0, AUTOCLEAR_BITMAPS if bitmaps else 0, 4, 112,
    )  # byte 104: compression type 0 (zlib), then padding to 112
    pos = 112
    if bitmaps:
        EXT.pack_into(header, pos, BITMAPS_EXT, BITMAPS_EXT_DATA.size)
        BITMAPS_EXT_DATA.pack_into(header, pos + 8, len(bitmaps), 0, len(directory), dir_off)
        pos += 8 + BITMAPS_EXT_DATA.size
    EXT.pack_into(header, pos, 0, 0)
    pieces.append((0, bytes(header)))
    rt = np.zeros(rtable * cw, dtype=">u8")
    rt[:rblocks] = rb_off + np.arange(rblocks, dtype=np.uint64) * np.uint64(cs)
    pieces.append((rt_off, rt.tobytes()))
    rb = np.zeros(rblocks * (cs // 2), dtype=">u2")
    rb[:total] = 1
    pieces.append((rb_off, rb.tobytes()))

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o600)
    except FileExistsError:
        raise Qcow2Error(f"{path}: already exists; a bitmap image is always a new file") from None
    except OSError as e:
        raise Qcow2Error(f"{path}: cannot create: {e.strerror}") from None
    try:
        for off, data in sorted(pieces, key=lambda p: p[0]):
            mv = memoryview(data)
            while mv.nbytes:
                n = os.pwrite(fd, mv, off)
                mv, off = mv[n:], off + n
        os.ftruncate(fd, total * cs)
        if sync:
            os.fsync(fd)
    except OSError as e:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise Qcow2Error(f"{path}: cannot write: {e.strerror}") from None
    os.close(fd)

