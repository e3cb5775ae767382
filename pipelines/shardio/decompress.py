"""Compressed tars: which compression a file holds, and its tar decompressed into a mapped file.

Why a temporary file and not a stream: the readers index a tar once and
group its members by key wherever they lie, which needs the members at
hand; decompressed into an unnamed temporary file and mapped, a compressed
tar is read by exactly the code that reads a plain one, and its bytes live
on disk, not in memory. The stream is decompressed until it ends or breaks:
what came out before a break is indexed like a truncated tar.
"""

from __future__ import annotations

import bz2
import lzma
import mmap
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

try:  # optional: zstd-compressed tars are read only with it
    import zstandard
except ImportError:
    zstandard = None


class TarDamage(RuntimeError):
    """The tar cannot be read to its end (truncated or corrupt)."""


class TarUnsupported(TarDamage):
    """The file is not a tar moda can read at all (an unknown compression); nothing in it was read."""


COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def compression(head: bytes) -> str | None:
    """The compression a file's first bytes announce, or None for a plain tar (or anything else)."""
    return next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)


def _decompressor(kind: str, path: str | Path):
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member; `cat`-joined ones: unused_data
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    if kind == "xz":
        return lzma.LZMADecompressor()
    if zstandard is None:
        raise TarUnsupported(f"{path}: a zstd-compressed tar, and the zstandard package is not installed: "
                             "`pip install zstandard`, or decompress it (`zstd -d`)")
    return zstandard.ZstdDecompressor().decompressobj()


def decompressed(source: BinaryIO, kind: str, path: str | Path) -> tuple[mmap.mmap | bytes, str | None]:
    """The compressed tar `source` reads (the file `path`, named in errors) decompressed into an
    unnamed temporary file, mapped; and why the stream stopped early, if it did (what came out
    before the damage is still there to index)."""
    damage = None
    with tempfile.TemporaryFile(prefix="moda-tar-") as out:
        decoder, chunk = _decompressor(kind, path), b""
        try:
            while chunk := source.read(1 << 20):
                while chunk:
                    out.write(decoder.decompress(chunk))
                    chunk = getattr(decoder, "unused_data", b"")  # gzip members joined by `cat`
                    if chunk:
                        decoder = _decompressor(kind, path)
            if not getattr(decoder, "eof", True):
                damage = f"the {kind} stream is cut short"
        except Exception as err:  # zlib.error, lzma.LZMAError, OSError, EOFError: the stream is damaged
            damage = f"the {kind} stream is corrupt ({err})"
        size = out.tell()
        if size == 0:
            return b"", damage
        out.flush()
        return mmap.mmap(out.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), damage
