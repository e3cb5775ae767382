"""The split's open output shards: written in the background, renamed into place when complete.

Each output shard is written under a temporary name by the tar writer's
background threads (shardio/tar_write.py), hashed as it is written, renamed
into place once the input shard that completes it is done, and recorded in
`progress/outputs/` (samples, sha256), which is how a rerun knows it is final.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json
from pipelines.shardio.tar_write import TarShardWriter, background


class OutputShards:
    """The open temporary output shards; each is renamed into place when complete.

    With several split processes, an output shard fed by input shards of more
    than one process (a `boundary` shard) is written by each of them as a
    fragment (members only, no end-of-archive), which the parent joins.
    """

    def __init__(self, layout: RunLayout, boundary: frozenset = frozenset(), worker: int = 0):
        self.layout = layout
        self.boundary = boundary
        self.worker = worker
        self.writers: dict[tuple[int, int], tuple[TarShardWriter, Path]] = {}
        self.counts: Counter = Counter()
        self.final: set[tuple[int, int]] = set()
        self.jobs: list = []
        for record in layout.output_records.glob("*.json"):
            e, k = (int(part) for part in record.stem.split("_"))
            if self.final_path(e, k).is_file():
                self.final.add((e, k))

    def final_path(self, e: int, k: int) -> Path:
        return self.layout.output_shard(e, k)

    def record_path(self, e: int, k: int) -> Path:
        return self.layout.output_record(e, k)

    def tmp_path(self, e: int, k: int) -> Path:
        final = self.final_path(e, k)
        return final.with_name(f".{final.name}.tmp")

    def is_final(self, e: int, k: int) -> bool:
        return (e, k) in self.final

    def fragment_path(self, e: int, k: int, worker: int) -> Path:
        final = self.final_path(e, k)
        return final.with_name(f".{final.name}.part{worker}")

    def _writer(self, e: int, k: int) -> TarShardWriter:
        if (e, k) not in self.writers:
            if (e, k) in self.boundary:
                tmp = self.fragment_path(e, k, self.worker)
            else:
                tmp = self.tmp_path(e, k)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writers[(e, k)] = (TarShardWriter(tmp), tmp)
        return self.writers[(e, k)][0]

    def write(self, e: int, k: int, key: str, files: dict[str, bytes] | memoryview) -> None:
        """Append a sample: its files, or its members exactly as they lie in the input tar."""
        writer = self._writer(e, k)
        if isinstance(files, dict):
            writer.add_sample(key, files)
        else:
            writer.add_raw(files)
        self.counts[(e, k)] += 1

    def write_pieces(self, e: int, k: int, pieces: list[memoryview]) -> None:
        """Append pieces of an input tar as they lie (whole samples; the caller counts them)."""
        self._writer(e, k).add_raw(*pieces)

    def hand_over(self) -> None:
        for writer, _ in self.writers.values():
            writer.hand_over()

    def close_fragments(self) -> dict[str, int]:
        """Close this process's fragments of boundary shards; their sample counts by "e_k"."""
        counts = {}
        for (e, k) in [ek for ek in self.writers if ek in self.boundary]:
            writer, _ = self.writers.pop((e, k))
            writer.close_fragment()
            counts[f"{e}_{k}"] = self.counts.pop((e, k), 0)
        return counts

    def join(self, e: int, k: int, workers: int, samples: int) -> None:
        """Make a boundary shard from its fragments, in process order, and rename it into place."""
        tmp = self.tmp_path(e, k)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        writer = TarShardWriter(tmp)
        for worker in range(workers):
            part = self.fragment_path(e, k, worker)
            if part.is_file():
                with open(part, "rb") as fragment:  # in 1 MiB pieces: a fragment can be most of a shard
                    while piece := fragment.read(1 << 20):
                        writer.add_raw(piece)
                part.unlink()
        self.writers[(e, k)] = (writer, tmp)
        self.counts[(e, k)] = samples
        self.finalize(e, k)

    def finalize(self, e: int, k: int) -> None:
        """End the shard; its last bytes, its rename into place and its record follow in the background."""
        if (e, k) in self.writers:
            writer, tmp = self.writers.pop((e, k))
        else:  # every sample of this output shard was rejected: an empty, valid tar
            tmp = self.tmp_path(e, k)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            writer = TarShardWriter(tmp)
        self.jobs.append(writer.close_then(self._publish, e, k, tmp, self.counts.pop((e, k), 0)))
        self.final.add((e, k))

    def _publish(self, sha256: str, e: int, k: int, tmp: Path, samples: int) -> None:
        """Rename a written shard into place and record it (hashed chunk by chunk as written: the
        file is not read again here)."""
        final = self.final_path(e, k)
        final.unlink(missing_ok=True)
        tmp.rename(final)
        atomic_write_json(self.record_path(e, k), {"samples": samples, "sha256": sha256})

    def after(self, job, *args) -> None:
        """Run `job` once everything handed to the background writer so far is written."""
        self.jobs.append(background().submit(job, *args))

    def wait(self) -> None:
        """Wait for the background jobs (raising the first error)."""
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job.result()
