"""The embed job's encoder on a Dask worker, with the nanny's MALLOC_TRIM_THRESHOLD_ and after
moda undoes it, against the same job in plain spawned processes.

    .venv/bin/python bench/dask_malloc.py [--shards 16] [--repeats 3] [--tmp DIR]

Peer, named: the embed stage's own encode (`clustering/embed.py`
encode_distinct over the captions of `--shards` synthetic shards, halved
between two jobs at once, one torch thread each) in two spawned processes
(pipelines/core/jobs.py run_local). Against it, the same two jobs on a
two-worker `distributed.LocalCluster`: once as the nanny starts its workers
(MALLOC_TRIM_THRESHOLD_=65536: glibc's adaptive mmap threshold off), once on
a fresh cluster whose jobs first call `undo_nanny_malloc()` as every moda
job on Dask does (pipelines/run/executors.py). Only the encode is timed
(imports and the model load are not). Repeats are interleaved; prints each
run, the medians and their ratio to the plain processes'.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio  # noqa: E402


def encode_job(paths: list[str], model: str, pooling: str, precision: str, batch_size: int,
               undo: bool = False) -> float:
    """Seconds to encode the shards' captions in this process with one torch thread."""
    if undo:
        from pipelines.run.executors import undo_nanny_malloc

        undo_nanny_malloc()
    import torch

    from clustering.captions import shard_captions
    from clustering.embed import encode_distinct
    from clustering.encoder import load_encoder

    torch.set_num_threads(1)
    encoder = load_encoder(model, pooling, "cpu", precision)
    texts = [t for p in paths for t in shard_captions(Path(p))[1]]
    t0 = time.perf_counter()
    encode_distinct(encoder, texts, batch_size)
    return time.perf_counter() - t0


def main() -> None:
    from distributed import Client, LocalCluster

    from pipelines.core.config import Config, load_config
    from pipelines.core.jobs import Call, run_local
    from pipelines.synth.generate import generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    import os
    import platform

    print(f"# {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}")
    embed = Config().embed
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        config = Path(tmp) / "gen.yaml"
        config.write_text(f"name: bench\nsynth: {{out_dir: {tmp}/data, num_train: {args.shards * 1000}, "
                          "shard_size: 1000, eval_per_class: 2, retrieval_pairs: 4}\n")
        generate(load_config(config).synth)
        shards = sorted(str(p) for p in (Path(tmp) / "data" / "train").glob("*.tar"))
        halves = [shards[: len(shards) // 2], shards[len(shards) // 2:]]
        common = (embed.model, embed.pooling, embed.precision, embed.batch_size)
        runs: dict[str, list[float]] = {"plain processes": [], "dask, nanny's malloc": [], "dask, undone": []}
        rounds: list[dict[str, list[float]]] = []
        for r in range(args.repeats):  # interleaved rounds, the order reversed every other one
            rounds.append({})
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                if name == "plain processes":
                    rounds[-1][name] = run_local([Call(encode_job, (h, *common)) for h in halves])
                    continue
                with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, Client(cluster) as client:
                    futures = [client.submit(encode_job, h, *common, undo=name == "dask, undone", pure=False)
                               for h in halves]
                    rounds[-1][name] = [f.result() for f in futures]
            for name, seconds in rounds[-1].items():
                runs[name] += seconds
            print({k: [round(v, 2) for v in vs] for k, vs in rounds[-1].items()}, flush=True)
    plain = statistics.median(runs["plain processes"])
    print("| where the job ran | median encode s | runs | against plain |\n|---|---|---|---|")
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {len(seconds)} | {median / plain:.2f}x the time |")
    for name in list(runs)[1:]:
        print(Ratio(f"{name}: encode time against plain processes",
                    tuple(statistics.median(one[name]) / statistics.median(one["plain processes"])
                          for one in rounds)))


if __name__ == "__main__":
    main()
