"""`moda estimate CONFIG`: launches, samples, FLOPs, disk and wall time of a run (or a sweep) on a
GPU, before anything runs (experts/budget.py does the arithmetic).

The GPU presets state this estimate in their header, on a line a test reads back
(`stated_estimate`), so the config and the figure it promises cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from pathlib import Path

from experts.budget import Estimate, combine_estimates, estimate_run
from experts.flops import flops_per_sample, parameter_count
from experts.train import model_config
from pipelines.core.config import Config, TrainConfig, load_config
from pipelines.core.layout import SIZES
from pipelines.run.sweep import point_config, points

ASSUMED_MFU = 0.10  # small CLIPs (20-40M parameters, 65 tokens) keep an H100 far from its peak; bench/gpu measures it
STATED = re.compile(r"^# Estimated on one (\w+) \(moda estimate\): ([\d.]+) min, ([\d.]+) GB disk", re.M)


@cache
def _model_costs(model: str, seed_checkpoint: str, batch_size: int,
                 patch_dropout: float) -> tuple[dict[str, float], int]:
    """FLOPs a sample and parameters of the architecture the train stage builds (a pretrained
    seed's own, experts/pretrained.py), with its patch dropout."""
    cfg = model_config(TrainConfig(model=model, seed_checkpoint=seed_checkpoint, patch_dropout=patch_dropout))
    return flops_per_sample(cfg, batch_size), parameter_count(cfg)


def training_samples(cfg: Config) -> int:
    """Pairs in the training set: the synthetic set's size when the run trains on it, else the
    shard folder's `sizes.json` or img2dataset `*_stats.json` files."""
    shards = Path(cfg.data.train_shards)
    if shards.resolve().is_relative_to(Path(cfg.synth.out_dir).resolve()):
        return cfg.synth.num_train
    if (shards / SIZES).is_file():
        return sum(json.loads((shards / SIZES).read_text()).values())
    stats = sorted(shards.glob("*_stats.json")) if shards.is_dir() else []
    if stats:
        return sum(json.loads(p.read_text()).get("successes", 0) for p in stats)
    raise ValueError(f"cannot count the pairs of {shards}: give --samples N")


def estimate_one(cfg: Config, samples: int, gpu: str, gpus: int, mfu: float) -> Estimate:
    flops, params = _model_costs(cfg.train.model, cfg.train.seed_checkpoint, cfg.train.batch_size,
                                 cfg.train.patch_dropout)
    return estimate_run(cfg, samples, flops, params, gpus=gpus, gpu=gpu, mfu=mfu)


def estimate_config(path: Path, sweep: bool | None = None, samples: int | None = None, gpu: str = "h100",
                    gpus: int = 1, mfu: float = ASSUMED_MFU) -> Estimate:
    """The estimate of `moda run path` (or of `moda sweep path`: every point, `sweep.parallel_points`
    at once; a config with `sweep.models` is taken as a sweep unless `sweep` says otherwise)."""
    cfg = load_config(path)
    samples = samples or training_samples(cfg)
    if sweep if sweep is not None else bool(cfg.sweep.models):
        # as the sweep places them: points sharing a GPU split its models_per_gpu between them
        parallel = cfg.sweep.parallel_points
        per_point = max(1, cfg.train.models_per_gpu // max(1, -(-parallel // gpus)))
        configs = [point_config(path, p) for p in points(cfg)]
        configs = [dataclasses.replace(c, train=dataclasses.replace(c.train, models_per_gpu=per_point))
                   for c in configs]
        parts = [estimate_one(c, samples, gpu, -(-gpus // parallel), mfu) for c in configs]
        return combine_estimates(parts, parallel, gpus)
    return estimate_one(cfg, samples, gpu, gpus, mfu)


def stated_estimate(path: Path) -> dict:
    """What a preset's header states: {"gpu", "minutes", "disk_gb"}."""
    match = STATED.search(Path(path).read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{path}: no '# Estimated on one GPU (moda estimate): M min, D GB disk' line")
    return {"gpu": match.group(1), "minutes": float(match.group(2)), "disk_gb": float(match.group(3))}


def stated_line(estimate: Estimate) -> str:
    """The header line a preset carries (what `stated_estimate` reads)."""
    return (f"# Estimated on one {estimate.assumptions['gpu'].upper()} (moda estimate): "
            f"{estimate.seconds / 60:.1f} min, {estimate.disk_bytes / 1e9:.1f} GB disk")
