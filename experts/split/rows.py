"""One input shard's assignment rows after another, from one pass over the assignments file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from experts.split.duplicate_keys import BATCH_ROWS


class AssignmentRows:
    """The (key, expert) assignment rows of one input shard after another, from one pass over the file.

    The cluster stage writes the rows in input-shard order, so the plan knows
    each shard's row range (`assignment_rows`) and this reader streams them
    in batches, keeping only the current shard's rows: constant memory, and
    each row read once. Without ranges (rows not in shard order), each shard's
    rows are found by a filtered read of the whole file.
    """

    def __init__(self, path: Path, ranges: dict[str, list[int]] | None):
        self.path, self.ranges = path, ranges
        self._file = pq.ParquetFile(path)
        self._schema = pa.schema([self._file.schema_arrow.field(c) for c in ("key", "expert")])
        self._batches = None
        self._held: list = []  # batches not yet consumed, the first starting at row self._start
        self._start = self._end = 0

    def of(self, shard: str) -> pa.Table:
        """The shard's rows, in file order (shards asked in plan order are read once)."""
        if self.ranges is None:
            return pq.read_table(self.path, columns=["key", "expert"], filters=[("shard", "==", shard)])
        lo, hi = self.ranges[shard]
        if self._batches is None or lo < self._start:
            self._seek(lo)
        while self._end < hi:
            batch = next(self._batches)
            self._held.append(batch)
            self._end += batch.num_rows
        table = pa.Table.from_batches(self._held, schema=self._schema).slice(lo - self._start, hi - lo)
        while self._held and self._start + self._held[0].num_rows <= hi:  # what later shards no longer need
            self._start += self._held.pop(0).num_rows
        return table

    def _seek(self, row: int) -> None:
        """Start reading at the row group that holds `row`."""
        meta = self._file.metadata
        first, start = 0, 0
        while first < meta.num_row_groups - 1 and start + meta.row_group(first).num_rows <= row:
            start += meta.row_group(first).num_rows
            first += 1
        self._batches = self._file.iter_batches(BATCH_ROWS, row_groups=range(first, meta.num_row_groups),
                                                columns=self._schema.names)
        self._held, self._start, self._end = [], start, start
