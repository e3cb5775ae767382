"""Evaluation images/s against clip_benchmark's on the same model and data, and moda's peak memory
at two task sizes.

    .venv/bin/python bench/eval_throughput.py [--sizes 5000 50000] [--peer-sizes 5000] [--workers 2] [--pairs 5]

Peer, named: clip_benchmark 1.6.2's `eval` (zeroshot_classification, `--no_amp`,
`--num_workers W` DataLoader processes, batch 64) on a clip_benchmark WebDataset
set (`test/{0..n-1}.tar` of 10,000 samples, its default). Ours: moda's evaluation
path on the same folder (load_tasks, then the image features streamed from the
shards with W decode threads, the zero-shot classifier, the logits), batch 64.
Both time from the model on disk to the metrics, in a fresh process each (the
libraries, torch and open_clip, imported before the clock on both sides), on
the same CPU threads; at the sizes both run, `--pairs` interleaved pairs of alternating order
(bench/pairs.py), and the ratio moda / clip_benchmark img/s is each pair's, printed as the median
with its range (moda alone runs once at the other sizes). The model is moda-small (a
randomly initialised local-dir folder: throughput does not depend on the
weights); images are 256 x 256 JPEGs (noise over a gradient), 10 classes.

Memory: the peak RSS of moda's process (ru_maxrss) at each size; the goal is
the largest within 1.2x of the smallest (memory independent of the task's size:
nothing decoded is kept). clip_benchmark's peak (its process and its loader
workers) is printed beside it for reference.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402

SHARD = 10_000  # clip_benchmark's default max_count per tar
BATCH = 64
CLASSES = 10


def make_model(folder: Path) -> None:
    from open_clip.model import CLIP

    from experts.models import model_config_dict, write_model_folder

    cfg = model_config_dict(str(ROOT / "experts" / "model_configs" / "moda-small.json"))
    write_model_folder(folder, cfg, CLIP(**cfg).state_dict())


def make_set(folder: Path, n: int, seed: int = 0) -> None:
    """A clip_benchmark classification set of n JPEGs in shards of 10,000."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "test").mkdir(parents=True)
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    shards = -(-n // SHARD)
    for s in range(shards):
        with tarfile.open(folder / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * SHARD, min(n, (s + 1) * SHARD)):
                label = int(rng.integers(CLASSES))
                pixels = (ramp[None, :, None] * (label + 1) / CLASSES + rng.normal(0, 40, (256, 256, 3)))
                buf = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="jpeg", quality=90)
                for name, data in ((f"s{i:07d}.jpg", buf.getvalue()), (f"s{i:07d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("\n".join(f"class {c}" for c in range(CLASSES)) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of a {c}.\n")


def child_moda(data: Path, model: Path, workers: int) -> dict:
    import open_clip  # noqa: F401 - imported before the clock, as the peer's `clip_benchmark.cli` imports it

    from evaluation.clip_features import classifier_weights, load_clip
    from evaluation.image_stream import stream_image_features
    from evaluation.tasks import load_tasks

    started = time.perf_counter()
    (task,) = load_tasks(data)
    clip = load_clip(model)
    logits = stream_image_features(clip, task.images, BATCH, workers) @ \
        classifier_weights(clip, task.classnames, task.templates).T
    acc1 = float((logits.argmax(1) == task.labels).mean())
    return {"seconds": time.perf_counter() - started, "images": task.images.total, "acc1": acc1}


def child_peer(data: Path, model: Path, workers: int) -> dict:
    import builtins

    import clip_benchmark.metrics.zeroshot_classification as z

    z.float = lambda x: builtins.float(np.asarray(x).reshape(()))  # its accuracy() under numpy 2
    from clip_benchmark.cli import main

    out = Path(tempfile.mkdtemp()) / "out.json"
    sys.argv = ["clip_benchmark", "eval", "--dataset", f"wds/{data.name}", "--dataset_root", str(data),
                "--model", f"local-dir:{model}", "--pretrained", "", "--task", "zeroshot_classification",
                "--no_amp", "--num_workers", str(workers), "--batch_size", str(BATCH), "--output", str(out)]
    started = time.perf_counter()
    main()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "acc1": json.loads(out.read_text())["metrics"]["acc1"]}


def measure(side: str, data: Path, model: Path, workers: int, n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--data", str(data), "--model", str(model),
                           "--workers", str(workers)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images_per_second"] = n / result["seconds"]
    return result


def median_run(runs: list[dict]) -> dict:
    """The median throughput of repeated runs, with the largest peak RSS seen and every run's img/s."""
    speeds = [r["images_per_second"] for r in runs]
    return {**runs[0], "images_per_second": float(np.median(speeds)), "all_images_per_second": speeds,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--peer-sizes", type=int, nargs="*", default=[5000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs at the peer sizes")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"eval_throughput_cpu_{date.today()}.md"))
    parser.add_argument("--child", choices=["moda", "peer"])
    parser.add_argument("--data")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.child:
        result = (child_moda if args.child == "moda" else child_peer)(Path(args.data), Path(args.model), args.workers)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({**result, "peak_rss_mib": own / 1024, "worker_peak_rss_mib": workers / 1024}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model")
        rows = []
        for n in args.sizes:
            t0 = time.perf_counter()
            make_set(root / f"set_{n}", n)
            print(f"[bench] wrote {n} images in {time.perf_counter() - t0:.0f} s", flush=True)
            side = {s: (lambda r, s=s, n=n: measure(s, root / f"set_{n}", root / "model", args.workers, n))
                    for s in ("moda", "peer")}
            ratio = None
            if n in args.peer_sizes:
                done = alternate(side["moda"], side["peer"], args.pairs, lambda r, a, b: print(
                    f"[bench] pair {r + 1}: moda {a['images_per_second']:.0f}, clip_benchmark "
                    f"{b['images_per_second']:.0f} img/s", flush=True))
                ours, peer = median_run([a for a, _ in done]), median_run([b for _, b in done])
                ratio = Ratio("moda / clip_benchmark img/s",
                              tuple(a["images_per_second"] / b["images_per_second"] for a, b in done))
            else:
                ours, peer = median_run([side["moda"](0)]), None
            rows.append((n, ours, peer, ratio))
            print(f"[bench] {n}: moda {ours}, clip_benchmark {peer}", flush=True)
            import shutil

            shutil.rmtree(root / f"set_{n}")
    small, large = rows[0][1]["peak_rss_mib"], rows[-1][1]["peak_rss_mib"]
    lines = [f"# Evaluation throughput and memory against clip_benchmark ({date.today()})", "",
             f"Machine: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
             f"usable cores, CPU. Command: `.venv/bin/python bench/eval_throughput.py --sizes "
             f"{' '.join(map(str, args.sizes))} --peer-sizes {' '.join(map(str, args.peer_sizes))} "
             f"--workers {args.workers} --pairs {args.pairs}`. At the sizes both ran: {args.pairs} interleaved "
             "pairs of alternating order; img/s are medians (each run's in brackets); the ratio is the median "
             f"of the per-pair ratios, with their range. Model moda-small (random init), 256 px JPEGs, batch {BATCH}, "
             f"{args.workers} decode workers each (moda: threads; clip_benchmark: DataLoader processes).", "",
             "| images | moda img/s | clip_benchmark img/s | ratio moda / clip_benchmark: median [range] "
             "| moda peak RSS MiB "
             "| clip_benchmark peak RSS MiB (main / workers) | acc1 moda / clip_benchmark |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, ours, peer, ratio in rows:
        if peer:
            lines.append(f"| {n} | {ours['images_per_second']:.0f} {fmt(ours)} | {peer['images_per_second']:.0f} "
                         f"{fmt(peer)} | "
                         f"{ratio.median:.2f}x [{ratio.low:.2f}, {ratio.high:.2f}] | {ours['peak_rss_mib']:.0f} "
                         f"| {peer['peak_rss_mib']:.0f} / {peer['worker_peak_rss_mib']:.0f} | "
                         f"{ours['acc1']:.4f} / {peer['acc1']:.4f} |")
        else:
            lines.append(f"| {n} | {ours['images_per_second']:.0f} | - | - | {ours['peak_rss_mib']:.0f} | - | "
                         f"{ours['acc1']:.4f} / - |")
    lines += ["", f"moda's peak RSS at {args.sizes[-1]} images is {large / small:.2f}x that at {args.sizes[0]} "
              "(goal: within 1.2x).", ""]
    lines += [str(ratio) for *_, ratio in rows if ratio] + [""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def fmt(run: dict) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in run["all_images_per_second"]) + "]"


if __name__ == "__main__":
    main()
