"""The embed stage's files: one parquet per input shard (key, shard, caption, embedding).

Written by the embed stage, read by the cluster stage (and by add-expert for
new data), so the format lives in one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.layout import RunLayout

STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embedding_table(keys: list[str], shard: str, captions: list[str], vectors: np.ndarray,
                    storage: str = "float32") -> pa.Table:
    """One embed output file's rows; `storage="float16"` halves the file (cosines move < 1e-3)."""
    dim = vectors.shape[1]
    dtype = np.float16 if storage == "float16" else np.float32
    flat = pa.array(vectors.reshape(-1).astype(dtype), type=STORAGE_TYPES[storage])
    return pa.table({
        "key": pa.array(keys, type=pa.string()),
        "shard": pa.array([shard] * len(keys), type=pa.string()),
        "caption": pa.array(captions, type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def read_embeddings(paths: list[Path]) -> tuple[pa.Table, np.ndarray]:
    """Concatenate per-shard embedding files -> (key/shard/caption table, float32 matrix)."""
    tables = [pq.read_table(p) for p in paths]
    table = pa.concat_tables(tables) if tables else pa.table({"key": [], "shard": []})
    if table.num_rows == 0:
        return table, np.zeros((0, 0), dtype=np.float32)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.drop_columns(["embedding"]), np.ascontiguousarray(matrix, dtype=np.float32)


def read_matrix(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """The (n, d) float32 embeddings of one embed file (float16 storage is widened)."""
    column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if rows is not None:
        matrix = matrix[rows]
    return np.ascontiguousarray(matrix, dtype=np.float32)


def embedding_files(layout: RunLayout, manifest: dict) -> list[Path]:
    """The per-shard embedding files an embed manifest lists, in shard order."""
    return [layout.embeddings(shard) for shard in manifest["shards"]]


def embedding_dim(path: Path) -> int:
    return pq.read_schema(path).field("embedding").type.list_size
