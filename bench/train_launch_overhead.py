"""moda's expert launch against the same open_clip_train command run by hand: wall clock from launch
to the final checkpoint.

    .venv/bin/python bench/train_launch_overhead.py [--samples 1500] [--epochs 2] [--pairs 6]

Peer, named: the exact `python -m open_clip_train.main ...` command that moda builds, run directly
with subprocess (no moda, no log streaming, no PDEATHSIG wrapper, no checkpoint check or export).
Both train the tiny CPU model from scratch on the same synthetic shards with the same threads.
What is timed is what a user waits for: from the launch to `epoch_<N>.pt` on disk (moda's side
also exports the local-dir model folder, as every train job does). The two run in interleaved
pairs (A B, B A, A B, ...: order alternates so neither always runs warm), and the ratio is the
median of the per-pair ratios (by hand / moda: above 1 means moda's launch costs less), with their
range. The trainer's own samples/s figure is printed too; it excludes start-up by construction, so
it cannot show launch overhead, only that the training inside is the same.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402

RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def rate(text: str) -> float:
    values = [float(v) for v in RATE.findall(text)][1:]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    from experts.jobs import Job
    from experts.launch import THREAD_VARS, TRAINER, trainer_command
    from experts.models import model_config_dict, write_model_folder
    from experts.train import train_job
    from pipelines.core.config import SynthConfig, TrainConfig
    from pipelines.core.devices import cpu_threads
    from pipelines.core.layout import RunLayout
    from pipelines.synth.generate import generate_train

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6, help="an even number: each order runs as often")
    args = parser.parse_args()
    cfg = TrainConfig(batch_size=32, warmup=5, patch_dropout=0.0)
    threads = cpu_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_train(SynthConfig(num_train=args.samples, shard_size=500), tmp / "data")
        shards = "::".join(str(p) for p in sorted((tmp / "data").glob("*.tar")))
        model_cfg = model_config_dict(str(ROOT / cfg.model))
        write_model_folder(tmp / "arch", model_cfg)
        spec = f"local-dir:{tmp / 'arch'}"

        def by_hand(r: int) -> tuple[float, float]:
            cmd = trainer_command(cfg, model_spec=spec, train_data=shards, num_samples=args.samples,
                                  logs=tmp / f"hand{r}", name="run", epochs=args.epochs, resume=None, device="cpu")
            cmd[cmd.index(TRAINER)] = "open_clip_train.main"  # the peer: open_clip's own entry point
            started = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, **dict.fromkeys(THREAD_VARS, str(threads))})
            seconds = time.perf_counter() - started
            assert (tmp / f"hand{r}" / "run" / "checkpoints" / f"epoch_{args.epochs}.pt").is_file()
            return seconds, rate(out.stdout + out.stderr)

        def moda(r: int) -> tuple[float, float]:
            layout = RunLayout(tmp / f"moda{r}")
            started = time.perf_counter()
            train_job(cfg, Job("run", shards, args.samples, args.epochs, 0, None, f"bench{r}"), layout=layout,
                      model_spec=spec, model_cfg=model_cfg, device="cpu", gpus=None)
            return time.perf_counter() - started, rate(layout.trainer_log("run").read_text())

        pairs = alternate(moda, by_hand, args.pairs, lambda r, m, h: print(
            f"pair {r + 1}: moda {m[0]:.2f} s ({m[1]:.1f} samples/s), "
            f"by hand {h[0]:.2f} s ({h[1]:.1f} samples/s)", flush=True))
    ratios = [h[0] / m[0] for m, h in pairs]
    for name, chosen in (("moda first", ratios[0::2]), ("by hand first", ratios[1::2])):
        if chosen:
            print(f"  pairs with {name}: ratio median {statistics.median(chosen):.3f}x over {len(chosen)}")
    print(f"wall clock, launch to final checkpoint: moda median {statistics.median(m[0] for m, _ in pairs):.2f} s, "
          f"by hand median {statistics.median(h[0] for _, h in pairs):.2f} s")
    print(Ratio("by hand / moda wall clock (> 1: moda costs less)", tuple(ratios)))
    print(f"trainer's own samples/s (excludes start-up): moda median {statistics.median(m[1] for m, _ in pairs):.1f}, "
          f"by hand {statistics.median(h[1] for _, h in pairs):.1f}")


if __name__ == "__main__":
    main()
