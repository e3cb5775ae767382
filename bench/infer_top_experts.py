"""`moda infer --top-experts k` against every expert: images/s and the accuracy it costs.

    .venv/bin/python bench/infer_top_experts.py [--system runs/demo] [--shards 'data/demo/train/{00000..00001}.tar']
                                                [--tasks data/demo/eval] [--pairs 4]

Peer, named: the same `moda infer` with every expert (the routed ensemble as evaluated). Speed: the
shard set labelled with each classification task's class list in turn, top-k against all in
interleaved pairs of alternating order (bench/pairs.py), each run a fresh output folder (nothing
skipped), the system loaded once before the clock (every expert's weights loaded: loading is not
what --top-experts saves here). Accuracy: top-1 of the routed ensemble on each task's test images,
all experts against the top k renormalised, with the paired difference's 95% bootstrap interval
over test samples (one trained system: training noise is not covered). Which k to use is a choice
to make on validation tasks; this prints what each k costs on the demo's test tasks, it chooses
nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pairs import Ratio, alternate
from evaluation.tasks import load_tasks
from reporting.stats import paired_bootstrap
from serving.infer import InferRequest, infer
from serving.predict import MoDESystem


def accuracy(system: MoDESystem, tasks, ks: list[int]) -> list[dict]:
    rows = []
    for task in tasks:
        images = list(task.images.decoded())
        full, weights = system.classify(images, task.classnames, task.templates)
        base = full.argmax(1) == task.labels
        for k in ks:
            probs, _ = system.classify(images, task.classnames, task.templates, top_experts=k)
            hits = probs.argmax(1) == task.labels
            diff = paired_bootstrap((hits.astype(float) - base.astype(float))[None, :], resamples=2000, seed=0)
            rows.append({"task": task.name, "k": k, "all": base.mean(), "top": hits.mean(), "diff": diff,
                         "weights": np.sort(weights)[::-1]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", default="runs/demo")
    parser.add_argument("--shards", default="data/demo/train/{00000..00001}.tar")
    parser.add_argument("--tasks", default="data/demo/eval")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    system = MoDESystem.load(args.system)
    n = len(system.expert_names)
    for e in range(n):
        system.model(e)
    tasks = [t for t in load_tasks(args.tasks) if t.kind == "classification"]
    ks = [k for k in (1, 2) if k < n]
    print(f"# {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {' '.join(sys.argv)}")
    print(f"system {args.system}: {n} experts; shards {args.shards}; tasks {[t.name for t in tasks]}")
    work = Path(tempfile.mkdtemp(prefix="moda-bench-infer-"))

    def timed(k: int | None):
        def run(r: int) -> float:
            seconds = 0.0
            for task in tasks:
                out = work / f"{k}-{r}-{task.name}"
                request = InferRequest(classes=tuple(task.classnames), templates=tuple(task.templates),
                                       top_experts=k, batch_size=args.batch_size)
                started = time.perf_counter()
                summary = infer(system, args.shards, out, request)
                seconds += time.perf_counter() - started
                shutil.rmtree(out)
            return summary["rows"] * len(tasks) / seconds
        return run

    for k in ks:
        pairs = alternate(timed(k), timed(None), args.pairs,
                          lambda r, a, b, k=k: print(f"pair {r + 1}: top-{k} {a:.0f} img/s, all {b:.0f} img/s"))
        print(Ratio(f"top-{k} / all {n} experts images/s", tuple(a / b for a, b in pairs)))
    shutil.rmtree(work, ignore_errors=True)
    print("\n| task | k | all experts top1 | top-k top1 | difference (points) [95% CI] |")
    print("|---|---:|---:|---:|---|")
    for row in accuracy(system, tasks, ks):
        d = row["diff"]
        print(f"| {row['task']} | {row['k']} | {row['all'] * 100:.1f} | {row['top'] * 100:.1f} | "
              f"{d.mean * 100:+.1f} [{d.low * 100:+.1f}, {d.high * 100:+.1f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
