"""What a run will cost before it starts: trainer launches, samples, FLOPs, wall time on a GPU, disk.

Pure arithmetic over the config (and the model's FLOPs per sample and parameter count, which the
caller measures with experts/flops.py): no file is read here. `moda estimate CONFIG` prints it; the
train stage calls `train_disk_need` before it launches anything and refuses, in one line, a run
whose folder's disk cannot hold it; the GPU presets state the estimate in their header (a test
recomputes it, so the stated figures cannot drift from the config).

Why estimate at all: a first run on an H100 node meets a 64 GB disk and a time slot. Every epoch
of an open_clip_train checkpoint holds fp32 weights and AdamW's two moments (12 bytes a parameter:
a 150M-parameter ViT-B/16 is 1.8 GB a checkpoint), and a repro with ablations trains dozens of
models; every launch pays process start, imports and CUDA initialisation before its first step.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.core.config import Config, parse_ablation

CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + the optimizer's two fp32 moments (AdamW and LAMB alike)
EXPORT_BYTES_PER_PARAM = 4  # the local-dir folder's fp32 safetensors
# Checkpoints one model holds on disk at its peak while it trains, with keep_checkpoints: needed:
# the epoch just saved, its predecessor (deleted right after), epoch_latest.pt and its tmp.pt copy.
PEAK_CHECKPOINTS = 4

# Assumptions of the wall-time estimate, stated wherever it is printed.
LAUNCH_SECONDS_GPU = 20.0  # process start + imports (6 s on CPU, bench/train_launch_overhead.py) + CUDA init
OTHER_STAGES_SECONDS = 60.0  # embed, cluster, split, evaluate, report at the presets' sizes (not measured)
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12}  # dense bf16 tensor-core peak (SXM)


@dataclass(frozen=True)
class Estimate:
    """One run's cost. `waves`: groups of launches that run at once (a wave costs one launch's
    start-up); `disk_bytes`: checkpoints and exported models at the end of training, plus the peak
    of the models training at once."""

    launches: int
    waves: int
    samples: int
    flops: float
    disk_bytes: int
    seconds: float
    assumptions: dict

    def lines(self) -> list[str]:
        a = self.assumptions
        return [f"trainer launches: {self.launches} in {self.waves} waves (models at once: {a['concurrent']})",
                f"samples trained: {self.samples:,}; training FLOPs: {self.flops:.3g}",
                f"disk for checkpoints and models: {self.disk_bytes / 1e9:.1f} GB "
                f"({a['checkpoint_bytes'] / 1e6:.0f} MB a checkpoint, keep_checkpoints: {a['keep']})",
                f"estimated wall time on one {a['gpu'].upper()}: {self.seconds / 60:.1f} min "
                f"(assumed: MFU {a['mfu']:.0%} of {a['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
                f"{a['launch_seconds']:.0f} s a launch wave, {a['other_seconds']:.0f} s for the other stages)"]


def checkpoint_bytes(params: int) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * params


def phases(masked_epochs: int, tune: int) -> int:
    """Trainer launches of one model: the masked epochs and the unmasked tune are two."""
    return (masked_epochs > 0) + (tune > 0)


def model_disk_bytes(params: int, epochs: int, keep: str) -> int:
    """What one trained model leaves: its final checkpoint (every epoch's with `keep: all`) and its
    exported folder."""
    kept = epochs if keep == "all" else 1
    return kept * checkpoint_bytes(params) + EXPORT_BYTES_PER_PARAM * params


def train_disk_need(params: int, models_left: int, epochs: int, concurrent: int, keep: str) -> int:
    """Bytes the train stage still needs: every model not yet trained at its end state, plus the
    transient checkpoints of the `concurrent` models training at once."""
    if models_left <= 0:
        return 0
    transient = min(concurrent, models_left) * (PEAK_CHECKPOINTS - 1) * checkpoint_bytes(params)
    return models_left * model_disk_bytes(params, epochs, keep) + transient


class DiskSpaceError(ValueError):
    """The run folder's disk cannot hold what training will write (a ValueError: `moda` prints it
    as one line)."""


def check_disk(folder: Path, need: int, what: str) -> str:
    """One line saying what `what` needs and what `folder`'s disk has; DiskSpaceError when it cannot
    hold it, before anything is written."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    line = f"{what} needs about {need / 1e9:.2f} GB on disk; {free / 1e9:.2f} GB free at {folder}"
    if need > free:
        raise DiskSpaceError(f"{line}: free space, move the run folder (--run-dir) to a larger disk, or set "
                             "train.keep_checkpoints: needed (if it is all); nothing was trained")
    return line


def loader_advice(workers: int, models_at_once: int, cores: int) -> str | None:
    """A line when the trainers' data-loader workers leave most of a GPU node's cores idle (they
    decode every JPEG; 1 worker a model starves a GPU), or ask for more than there are. None when
    they fit. Not changed for the user: `train.workers` sets how open_clip_train cuts an epoch into
    whole batches per worker, so it changes results and is part of the fingerprint."""
    used = workers * models_at_once
    fit = max(1, (cores - models_at_once) // max(1, models_at_once))  # a core each for the trainers
    if used > cores:
        return (f"train.workers {workers} x {models_at_once} models at once = {used} loader processes on "
                f"{cores} cores: they will compete; train.workers: {fit} fits")
    if used * 2 < cores and workers < fit:
        return (f"train.workers {workers} x {models_at_once} models at once uses {used} of {cores} cores for "
                f"decoding: the GPU may wait on data; train.workers: {fit} fits (it changes each epoch's "
                "sample count by whole batches, so it reruns training)")
    return None


def trained_sets(cfg: Config) -> list[tuple[int, int, int]]:
    """(experts, epochs, baselines) of each set of models trained from the seed: the run's own,
    then each ablation's (MoDE-k's k experts; an `expert_epochs=<e>` phase's experts and its baseline
    for e epochs; the others' n experts)."""
    t, n = cfg.train, cfg.cluster.num_experts
    sets = [(n, t.expert_epochs, int(t.baseline))]
    for variant in cfg.evaluate.ablations:
        kind, number = parse_ablation(variant)
        sets.append((number, t.expert_epochs, 0) if kind == "experts" else
                    (n, number, 1) if kind == "expert_epochs" else (n, t.expert_epochs, 0))
    return sets


def estimate_run(cfg: Config, num_samples: int, flops_per_sample: dict[str, float], params: int,
                 gpus: int = 1, gpu: str = "h100", mfu: float = 0.35) -> Estimate:
    """The training cost of `moda run cfg` over `num_samples` pairs on `gpus` GPUs of one kind.

    Counts what experts/train.py launches: per trainer seed the seed (unless given), every expert,
    the baseline and every ablation variant's models (trained_sets), each in one or two launches
    (masked, then unmasked tune); experts of one run train at once on `gpus x models_per_gpu` slots.
    """
    t = cfg.train

    def tune(epochs: int) -> int:  # as jobs.tune_epochs
        return 0 if t.patch_dropout <= 0 or t.unmasked_tune_share <= 0 else \
            min(epochs, math.ceil(t.unmasked_tune_share * epochs))

    concurrent = max(1, gpus // t.gpus_per_expert) * t.models_per_gpu
    sets = trained_sets(cfg)
    seeds = cfg.report.seeds
    seed_models = 0 if t.seed_checkpoint else 1
    per_set = [phases(e - tune(e), tune(e)) for _, e, _ in sets]
    launches = seeds * (seed_models + sum(p * (n + b) for p, (n, _, b) in zip(per_set, sets)))
    waves = seeds * (seed_models + sum(p * (-(-n // concurrent) + b) for p, (n, _, b) in zip(per_set, sets)))
    samples = seeds * num_samples * (seed_models * t.seed_epochs
                                     + sum(e * ((1 + cfg.split.ooc_ratio) + b) for _, e, b in sets))
    tuned = seeds * num_samples * sum(tune(e) * (1 + b) for _, e, b in sets)
    flops = (samples - tuned) * flops_per_sample["masked"] + tuned * flops_per_sample["unmasked"]
    models = seeds * (seed_models + sum(n + b for n, _, b in sets))
    epochs = t.seed_epochs + t.expert_epochs
    transient = concurrent * (PEAK_CHECKPOINTS - 1) * checkpoint_bytes(params)
    kept = seeds * seed_models * len(t.keep_seed_epochs) * checkpoint_bytes(params)  # the seed's other epochs
    disk = models * model_disk_bytes(params, epochs, t.keep_checkpoints) + transient + kept
    peak = PEAK_BF16_FLOPS[gpu] * gpus
    seconds = waves * LAUNCH_SECONDS_GPU + flops / (peak * mfu) + OTHER_STAGES_SECONDS * seeds
    return Estimate(launches, waves, int(samples), float(flops), int(disk), float(seconds),
                    {"gpu": gpu, "gpus": gpus, "mfu": mfu, "peak_flops": peak, "concurrent": concurrent,
                     "launch_seconds": LAUNCH_SECONDS_GPU, "other_seconds": OTHER_STAGES_SECONDS,
                     "checkpoint_bytes": checkpoint_bytes(params), "keep": t.keep_checkpoints,
                     "transient_bytes": transient})


def combine_estimates(parts: list[Estimate], parallel: int = 1, gpus: int = 1) -> Estimate:
    """Several runs (a sweep's points), `parallel` at once on `gpus` GPUs: their launches, samples,
    FLOPs and disk add up; their waves overlap `parallel` at a time; the other stages are paid once
    a point, `parallel` at a time."""
    first = parts[0]
    waves = -(-sum(p.waves for p in parts) // max(1, parallel))
    flops = sum(p.flops for p in parts)
    a = {**first.assumptions, "gpus": gpus, "peak_flops": PEAK_BF16_FLOPS[first.assumptions["gpu"]] * gpus,
         "concurrent": first.assumptions["concurrent"] * max(1, parallel),
         "checkpoint_bytes": max(p.assumptions["checkpoint_bytes"] for p in parts)}
    # what the points keep adds up; the checkpoints of the models training at once do not
    transient = max(p.assumptions["transient_bytes"] for p in parts) * max(1, parallel)
    disk = sum(p.disk_bytes - p.assumptions["transient_bytes"] for p in parts) + transient
    seconds = waves * a["launch_seconds"] + flops / (a["peak_flops"] * a["mfu"]) \
        + a["other_seconds"] * len(parts) / max(1, parallel)
    return Estimate(sum(p.launches for p in parts), waves, sum(p.samples for p in parts), flops,
                    disk, seconds, {**a, "points": len(parts), "parallel": parallel, "transient_bytes": transient})


def as_dict(estimate: Estimate) -> dict:
    return asdict(estimate)
