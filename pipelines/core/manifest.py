"""Atomic writes and stage manifests: what makes every stage restartable.

A stage writes each output under a temporary name and renames it into place,
so a killed process never leaves a half-written file under a real name. It
ends by writing `manifest.json`: the fingerprints of its inputs (upstream
manifests, input files), the hash of its own config section, counts and
timings. A rerun compares the fingerprint it would produce with the one on
disk and skips the stage when they match and every listed output still has
its recorded hash. The files are the source of truth, never Prefect's
database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipelines.core.devices import usable_cores
from pipelines.core.layout import MANIFEST, shard_id
from pipelines.core.shard_url import ShardURL


def _process_umask() -> int:
    """This process's umask (read by setting it and putting it back: once, at import, as no call
    only reads it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode a plain open() gives a new file here. mkstemp makes its file 0600, and the rename kept
# that: on a run folder shared by a team (NFS, Lustre), colleagues and services in the group could
# not read manifests, embeddings or clusters the owner's umask meant them to.
NEW_FILE_MODE = 0o666 & ~_process_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success. The file gets the
    mode the umask gives a new file, as a plain open() would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, NEW_FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        if err.filename is None:  # a failed write names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(stage_dir: str | Path) -> int:
    """Delete temporary files a killed run left in `stage_dir` (call before any writer starts)."""
    stale = list(Path(stage_dir).glob(".*.tmp")) if Path(stage_dir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_hashes(paths: list[Path], *manifests: dict[str, Any] | None) -> dict[str, str]:
    """sha256 of each input file, by file stem, reusing what earlier manifests recorded.

    A manifest that lists an input's hash under `inputs[stem]` and its
    [size, mtime_ns] under `input_stats[stem]` vouches for it while the file
    still has that size and modification time, so a rerun (or the next stage
    over the same shards) does not read terabytes of input again. A remote
    shard (`ShardURL`) stands for its listing's size and version instead, read
    from no byte of it.
    """
    known: dict[str, tuple[str, list[int]]] = {}
    for manifest in manifests:
        if manifest:
            for stem, stat in manifest.get("input_stats", {}).items():
                if stem in manifest.get("inputs", {}):
                    known[stem] = (manifest["inputs"][stem], stat)
    hashes: dict[str, str] = {}
    todo = []
    for path in paths:
        if isinstance(path, ShardURL):
            hashes[shard_id(path)] = path.identity
            continue
        path = Path(path)
        cached = known.get(shard_id(path))
        if cached and cached[1] == file_stat(path):
            hashes[shard_id(path)] = cached[0]
        else:
            hashes[shard_id(path)] = ""
            todo.append(path)
    for path, digest in zip(todo, hash_files(todo)):
        hashes[shard_id(path)] = digest
    return hashes


def hash_files(paths: list[Path]) -> list[str]:
    """sha256 of many files, several at once: hashlib releases the GIL on large blocks, so
    threads use every core (and keep several disk reads in flight)."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, usable_cores(), len(paths))) as pool:
        return list(pool.map(file_sha256, paths))


def input_stats(paths: list[Path]) -> dict[str, list[int]]:
    """[size, mtime_ns] per input file stem, for a manifest's `input_stats` (see `source_hashes`);
    [size, version] for a remote shard."""
    return {shard_id(p): p.stat if isinstance(p, ShardURL) else file_stat(Path(p)) for p in paths}


def combine(*parts: Any) -> str:
    """Hash any JSON-serialisable parts into one short fingerprint."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def require_manifest(stage_dir: str | Path, stage: str) -> dict[str, Any]:
    """The upstream manifest a stage depends on, or an error saying what to run."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{Path(stage_dir) / MANIFEST} is missing: run the {stage!r} stage first"
        )
    return manifest


def file_stat(path: Path) -> list[int]:
    """[size in bytes, mtime in ns]: what changes when a file is rewritten or replaced."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def outputs_intact(stage_dir: str | Path, manifest: dict[str, Any]) -> bool:
    """True when every output the manifest lists exists with its recorded hash."""
    return first_changed_output(stage_dir, manifest) is None


def first_changed_output(stage_dir: str | Path, manifest: dict[str, Any]) -> str | None:
    """The first output (relative path) the manifest lists that is missing or no longer has its
    recorded hash; None when all are intact.

    A file whose size and modification time are those recorded when the
    manifest was written is taken as unchanged without reading it (a rerun
    of a finished stage must not re-hash terabytes of shards); any other is
    hashed and compared.
    """
    root = Path(stage_dir)
    stats = manifest.get("output_stats", {})
    for rel, digest in manifest.get("outputs", {}).items():
        path = root / rel
        if not path.is_file():
            return rel
        if stats.get(rel) == file_stat(path):
            continue
        if file_sha256(path) != digest:
            return rel
    return None


def is_done(stage_dir: str | Path, fingerprint: str) -> bool:
    """Whether a stage already ran with this exact fingerprint and kept its outputs."""
    manifest = read_manifest(stage_dir)
    return (
        manifest is not None
        and manifest.get("fingerprint") == fingerprint
        and outputs_intact(stage_dir, manifest)
    )


def hash_outputs(stage_dir: str | Path, paths: list[Path]) -> dict[str, str]:
    root = Path(stage_dir)
    paths = sorted(paths)
    return {str(p.relative_to(root)): digest for p, digest in zip(paths, hash_files(paths))}


def write_manifest(
    stage_dir: str | Path,
    *,
    stage: str,
    fingerprint: str,
    config_hash: str,
    inputs: dict[str, str],
    outputs: dict[str, str],
    counts: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage's manifest last: its presence marks the stage complete."""
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "config_hash": config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "output_stats": {rel: file_stat(Path(stage_dir) / rel) for rel in outputs},
        "counts": counts,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest
