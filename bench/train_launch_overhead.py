"""moda's expert launch against the same open_clip_train command run by hand: samples/s.

    .venv/bin/python bench/train_launch_overhead.py [--samples 2000] [--epochs 2]

Peer, named: the exact `python -m open_clip_train.main ...` command that moda
builds, run directly with subprocess (no moda, no log streaming, no
PDEATHSIG wrapper). Both train the tiny CPU model from scratch on the same
synthetic shards; samples/s is the trainer's own figure (median of its
progress lines after the first), runs interleaved `--repeats` times, medians
compared. Prints both and the ratio moda / by hand.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def rates(text: str) -> float:
    values = [float(v) for v in RATE.findall(text)][1:]
    return statistics.median(values)


def main() -> None:
    from experts.launch import TRAINER, trainer_command
    from experts.models import model_config_dict, write_model_folder
    from experts.train import Job, train_job
    from pipelines.core.config import SynthConfig, TrainConfig
    from pipelines.core.layout import RunLayout
    from pipelines.synth.generate import generate_train

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = TrainConfig(batch_size=32, warmup=5, patch_dropout=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_train(SynthConfig(num_train=args.samples, shard_size=500), tmp / "data")
        shards = "::".join(str(p) for p in sorted((tmp / "data").glob("*.tar")))
        model_cfg = model_config_dict(str(ROOT / cfg.model))
        write_model_folder(tmp / "arch", model_cfg)
        spec = f"local-dir:{tmp / 'arch'}"
        hand_rates, moda_rates = [], []
        for r in range(args.repeats):  # interleaved, so drift on the machine hits both alike
            by_hand = trainer_command(cfg, model_spec=spec, train_data=shards, num_samples=args.samples,
                                      logs=tmp / f"hand{r}", name="run", epochs=args.epochs, resume=None,
                                      device="cpu")
            by_hand[by_hand.index(TRAINER)] = "open_clip_train.main"  # the peer: open_clip's own entry point
            hand = subprocess.run(by_hand, capture_output=True, text=True, check=True)
            hand_rates.append(rates(hand.stdout + hand.stderr))
            job = Job("run", shards, args.samples, args.epochs, 0, None, f"bench{r}")
            layout = RunLayout(tmp / f"moda{r}")
            train_job(cfg, job, layout=layout, model_spec=spec, model_cfg=model_cfg, device="cpu", gpus=None)
            moda_rates.append(rates(layout.trainer_log("run").read_text()))
        hand_rate, moda_rate = statistics.median(hand_rates), statistics.median(moda_rates)
    print(f"open_clip_train by hand: {hand_rate:.1f} samples/s")
    print(f"moda expert launch:      {moda_rate:.1f} samples/s")
    print(f"ratio moda / by hand:    {moda_rate / hand_rate:.3f}x")


if __name__ == "__main__":
    main()
