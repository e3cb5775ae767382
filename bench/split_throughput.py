"""Split stage throughput against a raw copy of the same tars, and peak memory at two sizes.

    .venv/bin/python bench/split_throughput.py [--small 4000] [--factor 10] [--image-size 128] [--repeats 5]
                                               [--processes 1] [--hash-inputs] [--cold] [--ooc-ratio 0]
                                               [--validate header]

Peers, named: (1) `shutil.copyfile` of the same input tar files (the floor
any split must pay: read every byte, write every byte); (2) the split itself
at `small` and `factor * small` samples, each in a fresh process, to show
that peak RSS does not grow with the data (each timed after the imports a
process pays once, pyarrow's lazy import of pandas included: a throughput,
not a start-up, figure). The cluster stage is replaced by
a seeded random assignment to 4 experts, so only the split is measured;
the embed stage is replaced by its manifest's record of the input shards'
sha256, which the split reuses in a pipeline run (`--hash-inputs` leaves it
out, so the split reads and hashes its input once more, as when run alone).
By default both read from the page cache (the input was just written);
`--cold` empties it before each (root only) and counts each one's
write-back (os.sync), which is how a dataset larger than memory is split.
Prints MB/s of both and their ratio, and both peak RSS figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402


def make_input(folder: Path, samples: int, image_size: int) -> list[Path]:
    from pipelines.core.config import SynthConfig
    from pipelines.synth.generate import generate_train

    generate_train(SynthConfig(num_train=samples, shard_size=1000, image_size=image_size), folder)
    return sorted(folder.glob("*.tar"))


def fake_cluster(folder: Path, shards: list[Path], experts: int = 4) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.manifest import write_manifest
    from pipelines.shardio.shards import iter_samples

    keys, names = [], []
    for shard in shards:
        for sample in iter_samples(shard):
            keys.append(sample.key)
            names.append(shard.stem)
    expert = np.random.default_rng(0).integers(experts, size=len(keys))
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"key": keys, "shard": names, "fine": expert, "expert": expert}),
                   folder / "assignments.parquet")
    write_manifest(folder, stage="cluster", fingerprint="bench", config_hash="bench", inputs={}, outputs={},
                   counts={}, started=time.time(), extra={"num_experts": experts})


def fake_embed(folder: Path, shards: list[Path]) -> None:
    """An embed manifest recording the input shards' sha256 and stats, as the embed stage does: in a
    pipeline run the split reuses them instead of reading the input twice (`source_hashes`)."""
    from pipelines.core.manifest import input_stats, source_hashes, write_manifest

    write_manifest(folder, stage="embed", fingerprint="bench", config_hash="bench",
                   inputs=source_hashes(shards), outputs={}, counts={}, started=time.time(),
                   extra={"input_stats": input_stats(shards)})


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM; ru_maxrss would include the parent's peak
    inherited across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_page_cache() -> None:
    """Write dirty pages back and empty the page cache (root only), so the next read comes from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        sys.exit(f"--cold needs root on Linux to drop the page cache ({err})")


def child(run: Path, processes: int, cold: bool, ooc_ratio: float, validate: str, shards: list[str]) -> None:
    """Run only the split in this process and report its time and peak RSS (its split workers' too)."""
    import pyarrow as pa

    from pipelines.core.config import DataConfig, SplitConfig
    from pipelines.run.stages import run_section

    pa.array([0])  # pyarrow imports pandas on its first conversion (0.25 s, once a process): not timed
    t0 = time.perf_counter()
    cfg = SplitConfig(shard_size=1000, processes=processes, ooc_ratio=ooc_ratio, validate=validate)
    manifest = run_section("split", cfg, run, DataConfig(train_shards=str(Path(shards[0]).parent)))
    if cold:
        os.sync()  # the copy's timing includes its write-back too
    seconds = time.perf_counter() - t0
    peak_mb = max(peak_rss_mb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "samples": manifest["counts"]["samples_in"]}))


def measure(tmp: Path, samples: int, image_size: int, repeats: int, processes: int, hash_inputs: bool,
            cold: bool, ooc_ratio: float, validate: str) -> dict:
    """Medians of `repeats` interleaved copies and splits; dirty pages are flushed before each
    (os.sync), so neither pays for the other's write-back."""
    data = tmp / f"in_{samples}"
    shards = make_input(data, samples, image_size)
    megabytes = sum(p.stat().st_size for p in shards) / 1e6

    def copy(r: int) -> float:
        copy_dir = tmp / f"copy_{samples}_{r}"
        copy_dir.mkdir()
        drop_page_cache() if cold else os.sync()
        t0 = time.perf_counter()
        for p in shards:
            shutil.copyfile(p, copy_dir / p.name)
        if cold:
            os.sync()
        seconds = time.perf_counter() - t0
        shutil.rmtree(copy_dir)
        return seconds

    def split(r: int) -> dict:
        run = tmp / f"run_{samples}_{r}"
        fake_cluster(run / "cluster", shards)
        (run / "embed").mkdir()
        if not hash_inputs:
            fake_embed(run / "embed", shards)
        drop_page_cache() if cold else os.sync()
        out = subprocess.run([sys.executable, __file__, "--child", str(run), str(processes), str(int(cold)),
                              str(ooc_ratio), validate, *map(str, shards)],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        shutil.rmtree(run)
        return json.loads(out)

    done = alternate(copy, split, repeats)
    copies, splits = [c for c, _ in done], [s for _, s in done]
    ratio = Ratio(f"split / raw copy MB/s at {samples} samples", tuple(c / s["seconds"] for c, s in done))
    copy_seconds = statistics.median(copies)
    split_seconds = statistics.median(s["seconds"] for s in splits)
    return {"samples": samples, "megabytes": round(megabytes, 1),
            "copy_mb_s": round(megabytes / copy_seconds, 1),
            "split_mb_s": round(megabytes / split_seconds, 1),
            "split_samples_s": round(samples / split_seconds, 1),
            "ratio_split_vs_copy": ratio.as_dict(),
            "peak_rss_mb": round(max(s["peak_rss_mb"] for s in splits), 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])), float(sys.argv[5]), sys.argv[6],
              sys.argv[7:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=4000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs (copy, split) per size")
    parser.add_argument("--processes", type=int, default=1, help="split.processes (0: one per two CPU cores)")
    parser.add_argument("--ooc-ratio", type=float, default=0.0, help="split.ooc_ratio (MoDE's reference: 0.02)")
    parser.add_argument("--hash-inputs", action="store_true",
                        help="no embed manifest: the split hashes its input shards itself (a stage run alone)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each timed copy and split (root), and count each "
                             "one's write-back: the input comes from disk, as a dataset larger than memory does")
    parser.add_argument("--validate", choices=("header", "decode"), default="header",
                        help="split.validate: `decode` decodes every image (on the process's share of the cores)")
    parser.add_argument("--tmp", default=None, help="where to write (default: the system temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = [measure(Path(tmp), n, args.image_size, args.repeats, args.processes, args.hash_inputs,
                        args.cold, args.ooc_ratio, args.validate)
                for n in (args.small, args.small * args.factor)]
    for row in rows:
        print(json.dumps(row))
    small, large = rows
    r = large["ratio_split_vs_copy"]
    print(Ratio(r["name"], tuple(r["values"])), f"({large['split_mb_s']} vs {large['copy_mb_s']} MB/s, medians)")
    print(f"peak RSS: {small['peak_rss_mb']} MB at {small['samples']} samples, "
          f"{large['peak_rss_mb']} MB at {large['samples']} samples "
          f"(ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for {args.factor}x the data)")


if __name__ == "__main__":
    main()
