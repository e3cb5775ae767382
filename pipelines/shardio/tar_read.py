"""Byte-level tar reading for WebDataset shards, at close to copy speed.

Why not `tarfile`: the split stage moves every sample of the dataset, and
tarfile costs tens of microseconds per member (TarInfo objects, PAX checks,
an extra copy per file), which at web-image sizes is several times the cost
of moving the bytes. Here a member costs one 512-byte header parse (checksum
verified), and the payload is a slice of a read-only map of the file.

Reading is strict, because a damaged shard must be reported, not half-read:
a bad header checksum, a member cut short, or a missing end-of-archive
block raises `TarDamage` after every complete member before it was yielded.
Data after an end-of-archive marker (two tars joined with `cat`) is read on,
as `tar --ignore-zeros` does. Compressed tars (gzip, bzip2, xz; zstd when the
`zstandard` package is installed) are decompressed into an unnamed temporary
file and mapped like any other (`decompress.py`), so every read path sees the
same members; a compression moda cannot read is refused by name
(`TarUnsupported`). The writer is `tar_write.py`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipelines.shardio.decompress import TarDamage, compression, decompressed
from pipelines.shardio.file_reader import FileReader
from pipelines.shardio.remote_shards import open_shard

BLOCK = 512
RECORD = 20 * BLOCK
ZEROS = bytes(RECORD)


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for values that do not fit in octal
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _size(header: bytes) -> int:
    """A member's size: the usual "%011o\\0" field directly, anything else (base-256, spaces) in full."""
    if header[135] in (0, 32):
        try:
            return int(header[124:135], 8)
        except ValueError:
            pass
    return _octal(header[124:136])


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a PAX extended header, if any ("%d path=...\\n" records)."""
    path = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


class TarIndex(NamedTuple):
    """Where every regular member of an uncompressed tar lies in a read-only map of the file.

    `members`: (name, header offset, payload offset, size, plain) in order;
    `plain` means the member is one ustar header plus payload (no PAX or GNU
    long-name record before it), so its bytes can be copied as they are.
    `damage`: why the tar cannot be read past its last listed member, or None.
    """

    view: memoryview
    members: list[tuple[str, int, int, int, bool]]
    damage: str | None
    cut_member: str | None = None
    """The name of the member whose payload the damage cut (its header was intact), if any."""
    skipped: tuple[str, ...] = ()
    """Entries that are not regular files (directories, links, devices): no sample's data."""


def _map(path: str | Path, mapped: bool = True, decompress: bool = True
         ) -> tuple[mmap.mmap | FileReader | bytes | None, str | None]:
    """(the tar's bytes, why a compressed stream stopped early or None).

    The bytes are the file mapped read-only (with `mapped=False` a `FileReader`),
    b"" when it is empty; a compressed tar decompressed into a mapped temporary
    file, or None with `decompress=False`. A remote shard (`remote_shards`) is
    fetched first and read the same way.
    """
    with open_shard(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return b"", None
        kind = compression(handle.read(6))
        if kind is not None:
            if not decompress:
                return None, None
            handle.seek(0)
            return decompressed(handle, kind, path)
        if not mapped:
            return FileReader(handle), None
        return mmap.mmap(handle.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), None


def index_tar(path: str | Path, mapped: bool = True) -> TarIndex:
    """Index a tar without copying its payloads (a compressed one after decompressing it).

    The file is mapped, not read: payloads are slices of the map, so a caller
    that passes samples through unchanged never copies them into Python
    objects. With `mapped=False` it is read with pread() (`FileReader`), and
    `view` slices are bytes read when asked for. Header checksums are verified
    for all members at once (numpy), and the member list is cut before the
    first bad header.
    """
    mapped, stream_damage = _map(path, mapped)
    if not mapped:
        return TarIndex(memoryview(b""), [], f"{path}: {stream_damage or 'no end-of-archive marker (empty file)'}")
    size = len(mapped)
    members: list[tuple[str, int, int, int, bool]] = []
    heads: list[int] = []
    headers: list[bytes] = []  # kept for the checksums: read once, whatever the reader
    pos, long_name, damage, cut = 0, None, None, None
    skipped: list[str] = []
    zero_block = ZEROS[:BLOCK]
    while True:
        if pos + BLOCK > size:
            damage = ("no end-of-archive marker (cut after a member)" if pos == size
                      else "a member header is cut short")
            break
        header = mapped[pos:pos + BLOCK]
        if header == zero_block:
            after = _after_zeros(mapped, pos)
            if after == size:
                if size - pos < 2 * BLOCK:
                    damage = "the end-of-archive marker is incomplete"
                break
            pos = after  # another archive follows (joined with `cat`): read on, as tar --ignore-zeros
            continue
        try:
            length = _size(header)
        except ValueError as err:
            damage = f"unreadable member header ({err})"
            break
        heads.append(pos)
        headers.append(header)
        if length < 0:
            damage = "negative member size"
            break
        start = pos + BLOCK
        following = padded_end(pos, length)
        if following > size:
            damage = "a member is cut short (truncated tar)"
            if header[156] in (0x30, 0, 0x37):
                cut = long_name or _ustar_name(header)
            break
        kind = header[156]
        if kind in (0x30, 0, 0x37):  # regular file ("0", NUL in old tars, "7" contiguous)
            if long_name is not None:
                members.append((long_name, pos, start, length, False))
                long_name = None
            else:
                members.append((_ustar_name(header), pos, start, length, True))
        elif kind == 0x78:  # "x": PAX extended header for the next member
            long_name = _pax_path(mapped[start:start + length])
        elif kind == 0x4C:  # "L": GNU long name for the next member
            long_name = mapped[start:start + length].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        else:  # directories, links, global PAX headers: no payload for a sample
            if kind in b"123456":
                skipped.append(long_name or _ustar_name(header))
            long_name = None
        pos = following
    first_bad = _first_bad_checksum(headers, heads)
    if first_bad is not None:
        members = [m for m in members if m[1] < first_bad]
        damage, cut = "bad header checksum (corrupt tar)", None
    if stream_damage:
        damage = f"{stream_damage}; {damage}" if damage else stream_damage
    view = mapped if isinstance(mapped, FileReader) else memoryview(mapped)
    return TarIndex(view, members, f"{path}: {damage}" if damage else None, cut, tuple(skipped))


def _ustar_name(header: bytes) -> str:
    """A member's name from its ustar header (prefix joined); bytes that are not UTF-8 kept as
    surrogates, for the reader to reject by name."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:262] == b"ustar" and header[345] != 0:
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = f"{prefix}/{name}"
    return name


def _after_zeros(mapped, pos: int, chunk: int = 1 << 20) -> int:
    """The offset of the first block at or after `pos` that is not all zeros (the file's size if none),
    read a MiB at a time (a map's slice or a reader's: the zeros end a tar, so this is its tail)."""
    size = len(mapped)
    whole_end = pos + (size - pos) // BLOCK * BLOCK
    while pos < whole_end:
        part = mapped[pos:min(whole_end, pos + chunk)]
        nonzero = np.flatnonzero(np.frombuffer(part, np.uint8).reshape(-1, BLOCK).any(1))
        if nonzero.size:
            return pos + int(nonzero[0]) * BLOCK
        pos += len(part)
    return pos if mapped[pos:size].count(0) != size - pos else size


def _blocks(mapped: mmap.mmap) -> np.ndarray:
    """The file's whole 512-byte blocks as rows of a uint8 array (a view of the map)."""
    return np.frombuffer(mapped, np.uint8, count=len(mapped) // BLOCK * BLOCK).reshape(-1, BLOCK)


def _header_rows(mapped: mmap.mmap, heads: list[int]) -> np.ndarray:
    """The 512-byte headers at these offsets, as rows of a uint8 array (a copy: the map stays free)."""
    return _blocks(mapped)[np.asarray(heads, dtype=np.int64) // BLOCK]


def _checksums_ok(rows: np.ndarray) -> np.ndarray:
    """Per header row: whether its checksum field holds the sum of its bytes (the field counted as spaces).

    All headers at once: a Python sum over 512 bytes would cost a couple of
    microseconds a member, a fair share of the split's time. The "%06o\\0 "
    form that tar, Python's tarfile and webdataset write is compared digit by
    digit; only rows in another form are read by `_octal_fields`.
    """
    actual = rows.sum(1, dtype=np.int64) - rows[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    digits = (actual[:, None] >> np.arange(15, -1, -3)) & 7
    ok = (rows[:, 148:154] == digits + 48).all(1) & (rows[:, 154] == 0) & (rows[:, 155] == 32)
    other = np.flatnonzero(~ok)
    ok[other] = actual[other] == _octal_fields(rows[other, 148:156])
    return ok


def _first_bad_checksum(headers: list[bytes], heads: list[int]) -> int | None:
    """Offset of the first header (their bytes `headers`, at offsets `heads`) whose checksum does not
    match, or None."""
    if not heads:
        return None
    bad = np.flatnonzero(~_checksums_ok(np.frombuffer(b"".join(headers), np.uint8).reshape(-1, BLOCK)))
    return heads[int(bad[0])] if bad.size else None


def _octal_fields(fields: np.ndarray) -> np.ndarray:
    """The octal numbers in rows of header field bytes: leading spaces, digits, then NUL or space.

    A field that does not read as a number gets -1 (never a valid checksum).
    """
    codes = fields.astype(np.int64)
    leading = np.cumprod(codes == 32, axis=1).astype(bool)
    digits = np.cumprod(leading | ((codes >= 48) & (codes <= 55)), axis=1).astype(bool) & ~leading
    value = np.zeros(len(codes), dtype=np.int64)
    for j in range(codes.shape[1]):
        value = np.where(digits[:, j], value * 8 + codes[:, j] - 48, value)
    count = digits.sum(1)
    after = leading.sum(1) + count
    ends = np.take_along_axis(codes, np.minimum(after, codes.shape[1] - 1)[:, None], 1)[:, 0]
    ok = (count > 0) & ((after == codes.shape[1]) | (ends == 0) | (ends == 32))
    return np.where(ok, value, -1)


class PlainTar(NamedTuple):
    """An intact tar of plain regular files, as arrays with one entry per member, in order.

    `data` is the whole file as uint8 (a view of the map); member i's header
    lies at byte `heads[i]`, its payload follows for `sizes[i]` bytes, and the
    member ends, padding included, at `ends[i]`. `names`: dtype S100.
    """

    view: memoryview
    data: np.ndarray
    names: np.ndarray
    heads: np.ndarray
    sizes: np.ndarray

    @property
    def ends(self) -> np.ndarray:
        return padded_end(self.heads, self.sizes)


def index_plain_tar(path: str | Path) -> PlainTar | None:
    """The common WebDataset shard indexed at array speed, or None when it is anything else.

    Not None only when every member is a regular file under one ustar header
    (no PAX or GNU long-name records, no name prefix, no directories), every
    header's checksum and size field check out, and the end-of-archive marker
    is there; `index_tar` reads every other tar and says what is wrong with it.
    The chain of members is found from the ustar magic and the size fields
    (`_chain_by_magic`, walked one header at a time when that fails); the
    headers it lands on are then verified in full, all at once.
    """
    mapped = _map(path, decompress=False)[0]
    if not mapped:
        return None
    chain = _chain_by_magic(mapped) or _chain_by_walk(mapped)
    if chain is None:
        return None
    heads, lengths = chain
    if _after_zeros(mapped, int(padded_end(heads[-1], lengths[-1]))) != len(mapped):
        return None  # another archive after the end marker: `index_tar` reads on
    rows = _header_rows(mapped, heads)
    names = np.ascontiguousarray(rows[:, :100]).view("S100").ravel()
    size_fields = rows[:, 124:136]
    intact = (np.isin(rows[:, 156], (0x30, 0, 0x37)).all() and not rows[:, 345].any()
              and ((size_fields[:, :11] >= 48) & (size_fields[:, :11] <= 55)).all()  # "%011o", then
              and np.isin(size_fields[:, 11], (0, 32)).all()                          # NUL or space
              and _checksums_ok(rows).all()
              and (np.strings.str_len(names) == np.count_nonzero(rows[:, :100], 1)).all())  # no NUL in a name
    if not intact:
        return None
    return PlainTar(memoryview(mapped), np.frombuffer(mapped, np.uint8), names, heads, lengths)


Chain = tuple[np.ndarray, np.ndarray]  # member header offsets, payload sizes


def _ends_archive(mapped: mmap.mmap, pos: int) -> bool:
    """Whether the end-of-archive marker (two zero blocks) lies at `pos`."""
    return pos <= len(mapped) - 2 * BLOCK and mapped[pos:pos + 2 * BLOCK] == ZEROS[:2 * BLOCK]


def padded_end(heads, sizes):
    """Where members end: header, payload, padding to a whole block (numbers or arrays)."""
    return heads + BLOCK + (sizes + BLOCK - 1) // BLOCK * BLOCK


def _chain_by_magic(mapped: mmap.mmap) -> Chain | None:
    """The member chain from block 0 to an end-of-archive marker, found without walking it: blocks
    that carry the "ustar" magic are taken as the headers, and the guess is kept only if each one's
    size lands exactly on the next and the last one's on the marker.

    Why: following the chain in Python costs about a microsecond a member, a
    sizeable share of the split's parsing. A payload block that happens to
    hold "ustar" at byte 257 (or a header without the magic, as old v7 tars
    write) breaks the exact landing, and None sends the caller to the walk:
    a wrong guess can cost time, never a wrong member.
    """
    blocks = _blocks(mapped)
    heads = np.flatnonzero(blocks[:, 257] == ord("u"))
    magic = blocks[heads, 257:262]
    heads = heads[(magic == np.frombuffer(b"ustar", np.uint8)).all(1)]
    if not heads.size or heads[0] != 0:
        return None
    sizes = _octal_fields(blocks[heads, 124:136])
    heads = heads * BLOCK
    ends = padded_end(heads, sizes)
    if (sizes < 0).any() or (ends[:-1] != heads[1:]).any() or not _ends_archive(mapped, int(ends[-1])):
        return None
    return heads, sizes


def _chain_by_walk(mapped: mmap.mmap) -> Chain | None:
    """The member chain from block 0 to an end-of-archive marker, followed by the size fields one
    header at a time."""
    heads: list[int] = []
    lengths: list[int] = []
    pos, last = 0, len(mapped) - 2 * BLOCK
    try:
        while pos <= last:
            size = int(mapped[pos + 124:pos + 135], 8)  # ValueError at the end marker (NULs)
            heads.append(pos)
            lengths.append(size)
            pos = padded_end(pos, size)
    except ValueError:
        pass
    if not heads or not _ends_archive(mapped, pos):
        return None
    return np.asarray(heads, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def read_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, payload) of every regular file in the tar, in order.

    Raises TarDamage when the archive is cut short or corrupt (after yielding
    the complete members before the damage). A tar that simply stops between
    two members is damaged too: only its missing end-of-archive blocks tell.
    """
    index = index_tar(path)
    view = index.view
    for name, _, start, size, _ in index.members:
        yield name, view[start:start + size].tobytes()
    if index.damage:
        raise TarDamage(index.damage)
