"""A shard read with pread() instead of a map, for readers that copy every payload anyway."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class FileReader:
    """A file read with pread(): `reader[a:b]` is those bytes, copied; nothing of the file stays in
    this process's memory.

    Why, next to the map: a mapped page that was read counts in the process's
    RSS while the map is open, and indexing alone touches every page of a shard
    of web-size samples (the kernel maps up to 64 KiB around each faulted header
    page), so reading a 300 MB shard through the map costs 300 MB of RSS. A
    reader that copies every payload anyway (`iter_samples` without views:
    evaluation, embed, verify) gains nothing from the map and keeps its memory
    at one sample's bytes.
    """

    def __init__(self, source: str | Path | BinaryIO):
        """`source`: a path, or an open file (read through a duplicate of its descriptor, so the
        caller may close it; an unnamed temporary file lives while the reader does)."""
        self._file = (os.fdopen(os.dup(source.fileno()), "rb") if hasattr(source, "fileno")
                      else open(source, "rb"))  # closed when the reader is dropped
        self._size = os.fstat(self._file.fileno()).st_size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self._size)
        return os.pread(self._file.fileno(), max(0, stop - start), start)

    def __del__(self):
        if hasattr(self, "_file"):
            self._file.close()
