"""Embed, cluster and split through the Dask executor against the local one, same cores and data.

    .venv/bin/python bench/dask_throughput.py [--pairs 16000] [--shard-size 500] [--workers 2]

Peer, named: the same three stages with `executor: local` (embed in one
process with the machine's threads, split in `split.processes` 0's processes)
on the same synthetic set. The Dask runs use a temporary local cluster of
`--workers` processes (one thread each) through the real `moda` flow and a
temporary Prefect server, so every job is a Prefect task on Dask. Prints each
stage's seconds (from its manifest: the work, job submission included) and
the flow's wall clock (the cluster's start included), and the throughput
ratio dask / local per stage and overall (goal: at least 0.9x, distributing
costs under 10%). Several `--workers` values (`--workers 1 4` on a machine
with 16 cores) also print the speed-up from the first to the last (goal at
least 3x from 1 to 4). Also checks that every Dask run wrote the local run's
bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["embed", "cluster", "split"]


def write_config(path: Path, data: Path, pairs: int, shard_size: int, **top) -> Path:
    raw = {"name": "bench", "synth": {"out_dir": str(data), "num_train": pairs, "shard_size": shard_size,
                                     "eval_per_class": 2, "retrieval_pairs": 4},
           "data": {"train_shards": str(data / "train"), "eval_tasks": str(data / "eval")},
           "cluster": {"num_fine": 64, "num_experts": 4, "sample_size": pairs // 4, "niter": 10},
           "split": {"shard_size": 1000}, **top}
    path.write_text(yaml.safe_dump(raw))
    return path


def timed_run(config: Path, run: Path) -> dict:
    from pipelines.run.flows import moda

    t0 = time.perf_counter()
    moda(config_path=str(config), run_dir=str(run), stages=STAGES)
    wall = time.perf_counter() - t0
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}
    return {"wall": round(wall, 1), **{s: m["seconds"] for s, m in manifests.items()},
            "outputs": {s: m["outputs"] for s, m in manifests.items()}}


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.core.config import load_config
    from pipelines.synth.generate import generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16_000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--keep", default=None, help="write the runs here and keep them")
    args = parser.parse_args()
    import os
    import platform

    print(f"# {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp = Path(args.keep) if args.keep else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        data = tmp / "data"
        generate(load_config(write_config(tmp / "gen.yaml", data, args.pairs, args.shard_size)).synth)
        rows = {"local": timed_run(write_config(tmp / "local.yaml", data, args.pairs, args.shard_size),
                                   tmp / "local")}
        for w in args.workers:
            config = write_config(tmp / f"dask{w}.yaml", data, args.pairs, args.shard_size, executor="dask",
                                  dask={"local_workers": w})
            rows[f"dask, {w} workers"] = timed_run(config, tmp / f"dask{w}")
    local = rows["local"]
    print("| executor | embed s | cluster s | split s | three stages s | flow wall s | same bytes |\n"
          "|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = row["outputs"] == local["outputs"]
        print(f"| {name} | {row['embed']} | {row['cluster']} | {row['split']} | "
              f"{round(sum(row[s] for s in STAGES), 1)} | {row['wall']} | {'yes' if same else 'NO'} |")
    for name, row in list(rows.items())[1:]:
        for stage in STAGES:
            differ = sorted(f for f in set(row["outputs"][stage]) | set(local["outputs"][stage])
                            if row["outputs"][stage].get(f) != local["outputs"][stage].get(f))
            if differ:
                print(f"{name}: {stage} wrote other bytes than the local run in {len(differ)} file(s), "
                      f"e.g. {differ[:4]}")
        ratios = ", ".join(f"{s} {local[s] / row[s]:.2f}x" for s in STAGES)
        total = sum(local[s] for s in STAGES) / sum(row[s] for s in STAGES)
        print(f"{name}: throughput against local {ratios}; three stages {total:.2f}x, flow wall "
              f"{local['wall'] / row['wall']:.2f}x")
    if len(args.workers) > 1:
        first, last = rows[f"dask, {args.workers[0]} workers"], rows[f"dask, {args.workers[-1]} workers"]
        speedup = sum(first[s] for s in STAGES) / sum(last[s] for s in STAGES)
        print(f"speed-up from {args.workers[0]} to {args.workers[-1]} workers: {speedup:.2f}x")


if __name__ == "__main__":
    main()
