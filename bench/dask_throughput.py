"""Embed, cluster and split through the Dask executor against the local one, same cores and data.

    .venv/bin/python bench/dask_throughput.py [--pairs 16000] [--shard-size 500] [--workers 2] [--repeats 5]

Peer, named: the same three stages with `executor: local` (embed in one
process with the machine's threads, split in `split.processes` 0's processes)
on the same synthetic set. The Dask runs use a temporary local cluster of
`--workers` processes (one thread each) through the real `moda` flow and a
temporary Prefect server, so every job is a Prefect task on Dask. Every run,
local or Dask, is a fresh process (cold, as a user's `moda run`). Prints each
stage's seconds (from its manifest: the work, job submission included) and
the flow's wall clock (the cluster's start included). The runs are
interleaved: `--repeats` rounds of local and each Dask size, the order
reversed every other round (bench/pairs.py), each in a fresh run folder; the
throughput ratio dask / local (three stages, and flow wall clock) is each
round's, printed as median and range (goal: at least 0.9x, distributing
costs under 10%). Several `--workers` values (`--workers 1 4` on a machine
with 16 cores) also print the speed-up from the first to the last, per round
(goal at least 3x from 1 to 4). Also checks that every Dask run wrote the
local run's bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio  # noqa: E402

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
    """One flow in a fresh process (its own temporary Prefect server, started before the clock), so
    every run, local or Dask, starts cold as a user's `moda run` does: no run inherits another's
    imports or loaded encoder."""
    done = subprocess.run([sys.executable, __file__, "--child", str(config), str(run)], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{config.name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(config: Path, run: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        print(json.dumps(flow_run(config, run)))


def flow_run(config: Path, run: Path) -> dict:
    from pipelines.run.flows import moda

    t0 = time.perf_counter()
    moda(config_path=str(config), run_dir=str(run), stages=STAGES)
    wall = time.perf_counter() - t0
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}
    shutil.rmtree(run)
    return {"wall": round(wall, 1), **{s: m["seconds"] for s, m in manifests.items()},
            "outputs": {s: m["outputs"] for s, m in manifests.items()}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    from pipelines.core.config import load_config
    from pipelines.synth.generate import generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16_000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (local and each Dask size)")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    import os
    import platform

    print(f"# {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}")
    sides = ["local", *(f"dask, {w} workers" for w in args.workers)]
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        generate(load_config(write_config(tmp / "gen.yaml", data, args.pairs, args.shard_size)).synth)
        configs = {"local": write_config(tmp / "local.yaml", data, args.pairs, args.shard_size)}
        for w in args.workers:
            configs[f"dask, {w} workers"] = write_config(tmp / f"dask{w}.yaml", data, args.pairs, args.shard_size,
                                                         executor="dask", dask={"local_workers": w})
        for r in range(args.repeats):
            order = sides if r % 2 == 0 else sides[::-1]
            rounds.append({name: timed_run(configs[name], tmp / f"run{r}") for name in order})
            print(f"round {r + 1} ({' then '.join(order)}): " + ", ".join(
                f"{name} {sum(rounds[-1][name][s] for s in STAGES):.1f} s" for name in sides), flush=True)
    print("| round | executor | embed s | cluster s | split s | three stages s | flow wall s | same bytes |\n"
          "|---|---|---|---|---|---|---|---|")
    for r, rows in enumerate(rounds):
        for name in sides:
            row = rows[name]
            same = row["outputs"] == rounds[0]["local"]["outputs"]
            print(f"| {r + 1} | {name} | {row['embed']} | {row['cluster']} | {row['split']} | "
                  f"{round(sum(row[s] for s in STAGES), 1)} | {row['wall']} | {'yes' if same else 'NO'} |")
            for stage in STAGES:
                ref = rounds[0]["local"]["outputs"][stage]
                differ = sorted(f for f in set(row["outputs"][stage]) | set(ref)
                                if row["outputs"][stage].get(f) != ref.get(f))
                if differ:
                    print(f"round {r + 1}, {name}: {stage} wrote other bytes than the local run in "
                          f"{len(differ)} file(s), e.g. {differ[:4]}")

    def total(row: dict) -> float:
        return sum(row[s] for s in STAGES)

    for name in sides[1:]:
        print(Ratio(f"{name}: throughput against local, three stages",
                    tuple(total(rows["local"]) / total(rows[name]) for rows in rounds)))
        print(Ratio(f"{name}: throughput against local, flow wall clock",
                    tuple(rows["local"]["wall"] / rows[name]["wall"] for rows in rounds)))
        for stage in STAGES:
            per = [rows["local"][stage] / rows[name][stage] for rows in rounds]
            print(f"  {stage}: median {statistics.median(per):.2f}x, range {min(per):.2f}-{max(per):.2f}x")
    if len(args.workers) > 1:
        first, last = sides[1], sides[-1]
        print(Ratio(f"speed-up from {args.workers[0]} to {args.workers[-1]} workers",
                    tuple(total(rows[first]) / total(rows[last]) for rows in rounds)))


if __name__ == "__main__":
    main()
