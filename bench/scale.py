"""The control path at LAION's layout: time and peak memory per stage as the shard count grows.

    .venv/bin/python bench/scale.py shards [--count 41000] [--per-shard 3] [--missing 3] [--fractions 0.1 0.3 1]
    .venv/bin/python bench/scale.py assign [--samples 1000000] [--factor 10]

`shards`: img2dataset's layout without images worth keeping: `count` input
shards of `per_shard` samples (one 16x16 JPEG each, short captions), named
by a brace pattern with `missing` of them absent (skipped and counted, as
LAION's gaps are), through the real embed stage (its encoder replaced by a
hash of each caption, so only the control path is timed: listing, tar
reading, one parquet file and marker per shard, the manifest), the real
cluster stage, the split (plan and stream), `moda verify` (reading the inputs again, and
`--inputs recorded`), and the seed's
trainer command line over every expert shard, at `fractions` of `count` (at
least three sizes). Time is not compared as a ratio of totals, which a fixed
cost (imports, pools, a model load) bends towards the small run: each step's
seconds are fitted as fixed + per_shard * shards (bench/pairs.py fit_line),
and the claim "flat per shard" is the marginal cost per shard between the two
largest sizes against that between the two smallest. Goal: that within 1.2x,
peak RSS at `count` within 1.3x of the smallest size's, every launch command
line under 64 KiB (Linux caps one argument at 128 KiB).

`assign`: the cluster stage on synthetic caption embeddings written as the
embed stage writes them (10,000 rows a file, 384-d float16, key, shard and
caption columns, its markers and manifest), at `samples` and `factor` times
as many: the fine k-means is fitted on a fixed sample of 200,000 (its time
is reported apart), every sample is then assigned to its nearest of 1,024
fine centres file by file. Peer, named: the smaller size. Goal: assignment
time per sample within 1.2x, peak RSS within 1.3x.

Each stage runs in a fresh process (`--child`), so its peak RSS (VmHWM, its
worker processes' included) is its own; nothing else may run meanwhile (a
benchmark beside another job measures nothing).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pairs import fit_line, slopes  # noqa: E402
from bench.split_throughput import peak_rss_mb  # noqa: E402

NOUNS = ["cat", "dog", "car", "chair", "mountain", "river", "guitar", "pizza", "bridge", "robot", "tulip", "boat"]
PLACES = ["beach", "kitchen", "street", "forest", "studio", "garden", "desert", "office"]
LAUNCH_LIMIT = 64 * 1024


def tiny_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(out, format="JPEG", quality=80)
    return out.getvalue()


def make_shards(folder: Path, count: int, per_shard: int, missing: int) -> str:
    """`count` img2dataset-style shards (`00000.tar` ...) in one folder, `missing` of them then
    deleted (spread over the range); returns the brace pattern naming all `count`."""
    from pipelines.shardio.shards import ShardSetWriter

    jpeg = tiny_jpeg()
    writer = ShardSetWriter(folder, shard_size=per_shard)
    for i in range(count * per_shard):
        caption = f"a photo of a {NOUNS[i % len(NOUNS)]} in the {PLACES[(i // 7) % len(PLACES)]}, number {i}"
        writer.write(f"{i // per_shard:05d}{i % per_shard:04d}", {"jpg": jpeg, "txt": caption.encode()})
    writer.close()
    for k in range(missing):
        (folder / f"{(k + 1) * count // (missing + 1):05d}.tar").unlink()
    return f"{folder}/{{00000..{count - 1:05d}}}.tar"


def hashed_encoder(encoder, texts: list[str], batch_size: int):
    """A stand-in for the sentence encoder: a unit vector drawn from each caption's crc32 (only
    the control path around the encoder is measured)."""
    import numpy as np

    out = np.empty((len(texts), 384), np.float32)
    for i, text in enumerate(texts):
        out[i] = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(384)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_embeddings(run: Path, samples: int, per_file: int = 10_000) -> None:
    """An embed stage folder of `samples` synthetic rows, as the embed stage writes it."""
    import numpy as np

    from clustering.embed import write_shard_output
    from clustering.embeddings import embedding_table
    from pipelines.core.layout import RunLayout
    from pipelines.core.manifest import hash_outputs, write_manifest

    layout, rng, stems = RunLayout(run), np.random.default_rng(0), []
    centres = rng.standard_normal((64, 384)).astype(np.float32)
    layout.embed.mkdir(parents=True)
    for f in range(-(-samples // per_file)):
        n = min(per_file, samples - f * per_file)
        x = centres[rng.integers(64, size=n)] + 0.5 * rng.standard_normal((n, 384), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        stem = f"{f:05d}"
        keys = [f"{stem}{i:05d}" for i in range(n)]
        captions = [f"a photo of a {NOUNS[i % len(NOUNS)]} number {i}" for i in range(n)]
        write_shard_output(layout, stem, embedding_table(keys, stem, captions, x, "float16"),
                           {"config": "bench", "source_sha256": "bench", "embedded": n, "rejects": []})
        stems.append(stem)
    write_manifest(layout.embed, stage="embed", fingerprint="bench", config_hash="bench", inputs={},
                   outputs=hash_outputs(layout.embed, [layout.embeddings(s) for s in stems]),
                   counts={"samples_in": samples, "embedded": samples}, started=time.time(),
                   extra={"shards": stems, "dim": 384})


def seed_launch(run: Path) -> dict:
    """The seed's trainer command over every expert shard the split wrote (the longest list any
    launch carries), recorded instead of run; and each expert's --train-data."""
    import experts.train as train
    from pipelines.core.config import DataConfig, TrainConfig
    from pipelines.core.layout import RunLayout
    from pipelines.core.stage import StageContext
    from pipelines.core.stage import upstream_manifests as upstream

    launched = []

    class Launched(Exception):
        pass

    def record(cmd, *args, **kwargs):
        launched.append(cmd)
        raise Launched

    train.run_trainer = record
    layout = RunLayout(run)
    ctx = StageContext(TrainConfig(device="cpu", batch_size=4), DataConfig(), layout, upstream(train.STAGE, layout))
    try:
        train.work(ctx, train.fingerprint(ctx))
    except Launched:
        pass
    cmd = launched[0]
    data = cmd[cmd.index("--train-data") + 1]
    from webdataset.shardlists import expand_urls

    return {"seed_command_bytes": sum(len(arg.encode()) + 1 for arg in cmd), "seed_train_data_bytes": len(data),
            "expert_shards": len(expand_urls(data))}


def child(what: str, run: Path, spec: str, per_shard: int) -> None:
    """One stage (or check) in this process; print its seconds, peak RSS and counts."""
    import pyarrow as pa

    from pipelines.core.config import ClusterConfig, DataConfig, EmbedConfig, SplitConfig
    from pipelines.run.stages import run_section

    pa.array([0])  # pyarrow's lazy import of pandas: once a process, not timed
    data = DataConfig(train_shards=spec, missing_shards="skip")
    t0 = time.perf_counter()
    if what == "list":
        from pipelines.shardio.shards import select_shards

        shards, missing = select_shards(spec, "skip")
        counts = {"shards": len(shards), "missing": len(missing)}
    elif what == "embed":
        import clustering.embed as embed

        embed.encode_distinct = hashed_encoder
        counts = run_section("embed", EmbedConfig(processes=1, device="cpu"), run, data)["counts"]
    elif what == "cluster":
        counts = run_section("cluster", ClusterConfig(num_fine=64, num_experts=4, sample_size=50_000, niter=10),
                             run, data)["counts"]
    elif what == "assign":
        manifest = run_section("cluster", ClusterConfig(num_fine=1024, num_experts=8, sample_size=200_000, niter=10,
                                                        terms_sample=20_000), run, data)
        counts = manifest["counts"]
    elif what == "split":
        # expert shards as small as the input's: as many output shards as input shards, as LAION's
        # 41,000 shards of 10,000 make about 41,000 expert shards of 10,000
        counts = run_section("split", SplitConfig(shard_size=per_shard), run, data)["counts"]
    elif what in ("verify", "verify-recorded"):
        from experts.split.verify import verify_split

        problems, counts = verify_split(run, "recorded" if what == "verify-recorded" else "read")
        if problems:
            raise SystemExit(f"verify found problems: {problems[:3]}")
    elif what == "launch":
        counts = seed_launch(run)
    else:
        raise SystemExit(f"unknown child {what!r}")
    seconds = time.perf_counter() - t0
    peak = max(peak_rss_mb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"what": what, "seconds": round(seconds, 4), "peak_rss_mb": round(peak, 1),
                      "counts": counts}, default=str))


def run_child(what: str, run: Path, spec: str, per_shard: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", what, str(run), spec, str(per_shard)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-4000:]}")
    out = done.stdout.strip().splitlines()[-1]
    print(out, flush=True)
    return json.loads(out)


def shards_point(tmp: Path, count: int, per_shard: int, missing: int) -> dict:
    t0 = time.perf_counter()
    spec = make_shards(tmp / f"laion_{count}", count, per_shard, missing)
    print(f"wrote {count} shards in {time.perf_counter() - t0:.0f} s", flush=True)
    run = tmp / f"run_{count}"
    return {what: run_child(what, run, spec, per_shard)
            for what in ("list", "embed", "cluster", "split", "verify", "verify-recorded", "launch")}


def assign_point(tmp: Path, samples: int) -> dict:
    run = tmp / f"assign_{samples}"
    t0 = time.perf_counter()
    make_embeddings(run, samples)
    print(f"wrote {samples} embeddings in {time.perf_counter() - t0:.0f} s", flush=True)
    result = run_child("assign", run, "")
    fit = result["counts"]["fit_seconds"]
    return {**result, "fit_seconds": fit, "assign_seconds": round(result["seconds"] - fit, 2)}


def shards_table(sizes: list[int], points: dict[int, dict]) -> str:
    """Per step: seconds at each size, the fitted fixed and per-shard costs, the marginal per-shard
    cost's growth (largest interval against smallest) and peak RSS at the largest size against the
    smallest."""
    head = " | ".join(f"s at {n:,}" for n in sizes)
    lines = [f"| step | {head} | fixed s (fit) | ms per shard (fit) | marginal per-shard cost, "
             f"{sizes[-2]:,}-{sizes[-1]:,} against {sizes[0]:,}-{sizes[1]:,} | peak RSS MB "
             f"{' / '.join(f'{n:,}' for n in sizes)} | RSS ratio |",
             "|---|" + "---|" * (len(sizes) + 5)]
    for what in points[sizes[0]]:
        secs = [points[n][what]["seconds"] for n in sizes]
        rss = [points[n][what]["peak_rss_mb"] for n in sizes]
        fixed, per = fit_line(sizes, secs)
        marginal = slopes(sizes, secs)
        growth = marginal[-1] / marginal[0] if marginal[0] > 0 else float("nan")
        lines.append(f"| {what} | {' | '.join(f'{v:g}' for v in secs)} | {fixed:.2f} | {per * 1000:.3f} | "
                     f"{growth:.2f}x | {' / '.join(f'{v:g}' for v in rss)} | {rss[-1] / rss[0]:.2f}x |")
    return "\n".join(lines)


def machine() -> str:
    import os

    return f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, " \
           f"Python {platform.python_version()}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("shards")
    s.add_argument("--count", type=int, default=41_000)
    s.add_argument("--per-shard", type=int, default=3)
    s.add_argument("--missing", type=int, default=3)
    s.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0],
                   help="sizes as fractions of --count (at least three)")
    a = sub.add_parser("assign")
    a.add_argument("--samples", type=int, default=1_000_000)
    a.add_argument("--factor", type=int, default=10)
    parser.add_argument("--tmp", default=None, help="where to write (default: the system temp folder)")
    args = parser.parse_args()
    print(f"# {machine()}; {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if args.part == "shards":
            sizes = sorted({max(10, round(args.count * f)) for f in args.fractions})
            if len(sizes) < 3:
                raise SystemExit("--fractions: a per-shard slope needs at least three distinct sizes")
            points = {n: shards_point(Path(tmp), n, args.per_shard, args.missing) for n in sizes}
            print(shards_table(sizes, points))
            launch = points[sizes[-1]]["launch"]["counts"]
            print(f"seed launch over {launch['expert_shards']} expert shards (from {sizes[-1]} input shards): "
                  f"{launch['seed_command_bytes']} bytes "
                  f"(limit {LAUNCH_LIMIT}: {'under' if launch['seed_command_bytes'] < LAUNCH_LIMIT else 'OVER'})")
        else:
            small = assign_point(Path(tmp), args.samples)
            large = assign_point(Path(tmp), args.samples * args.factor)
            per = (large["assign_seconds"] / large["counts"]["samples"]) / \
                (small["assign_seconds"] / small["counts"]["samples"])
            total = (large["seconds"] / large["counts"]["samples"]) / (small["seconds"] / small["counts"]["samples"])
            print("| samples | cluster stage s | fit s | assign s | peak RSS MB |\n|---|---|---|---|---|")
            for row in (small, large):
                print(f"| {row['counts']['samples']} | {row['seconds']} | {row['fit_seconds']} | "
                      f"{row['assign_seconds']} | {row['peak_rss_mb']} |")
            print(f"assignment time per sample: {per:.2f}x at {args.factor}x the samples (whole stage {total:.2f}x); "
                  f"peak RSS {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
