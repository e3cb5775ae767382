"""The arithmetic of training jobs: what a model trains on, for how long, in which schedule, and
how many samples that is. Pure functions of the config (no process is started here); the train
stage (experts/train.py) and an added expert (pipelines/run/add_expert.py) build their jobs here.

Two accountings of an expert's epoch (`train.expert_epoch`): `cluster`, moda's fair one, an epoch
is the expert's own cluster once, so n experts together cost what one model costs; `dataset`, the
paper's, an epoch is as many samples as the whole data set, drawn with replacement from the
expert's own shards, so MoDE-n costs (seed + n x expert) / (seed + expert) models and is compared
both with the single model at that cost (the baseline) and at 1x (`baseline_1x`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from experts.flops import samples_per_epoch
from pipelines.core.config import TrainConfig
from pipelines.shardio.brace import compact_shards


@dataclass
class Job:
    """One model to train: from `start_from` (at `start_epoch`) to `epochs` in total, as part of
    a cosine schedule of `schedule` epochs (default: `epochs`; MoDE's seed stops before its
    schedule ends, and the experts continue it)."""

    name: str
    train_data: str
    num_samples: int | None
    epochs: int
    start_epoch: int
    start_from: Path | None
    fingerprint: str
    tune_epochs: int = 0  # final epochs without patch dropout (FLIP's unmasked tune)
    schedule: int | None = None
    resampled: bool = False  # shards drawn with replacement (an epoch of num_samples, not one pass)
    keep: tuple[int, ...] = ()  # epoch checkpoints kept besides the final one (the seed's, for other phases)

    @property
    def schedule_epochs(self) -> int:
        return self.schedule or self.epochs


def tune_epochs(cfg: TrainConfig, epochs: int) -> int:
    """How many of a run's last `epochs` are the unmasked tune (0 without patch dropout)."""
    if cfg.patch_dropout <= 0 or cfg.unmasked_tune_share <= 0:
        return 0
    return min(epochs, math.ceil(cfg.unmasked_tune_share * epochs))


def expert_job(cfg: TrainConfig, name: str, shards: list[Path], start: tuple[Path, int],
               fingerprint: str, dataset_samples: int | None = None) -> Job:
    """An expert's job: its shards from the seed's start, `expert_epochs` more, the last ones unmasked.
    With `expert_epoch: dataset` an epoch is `dataset_samples` drawn with replacement (the paper's);
    else one pass over its own shards (their sizes.json)."""
    start_ckpt, start_epoch = start
    paper = cfg.expert_epoch == "dataset"
    return Job(name, compact_shards([str(p.resolve()) for p in shards]), dataset_samples if paper else None,
               start_epoch + cfg.expert_epochs, start_epoch, start_ckpt, fingerprint,
               tune_epochs(cfg, cfg.expert_epochs), resampled=paper)


def baseline_jobs(cfg: TrainConfig, shards: str, start: tuple[Path, int], experts: int, expert_samples: int,
                  dataset_samples: int, fingerprint: str) -> list[Job]:
    """The single models continued from the seed on all data: `baseline`, the experts' compute
    (their samples together: one data set's worth an epoch in moda's accounting, n in the paper's,
    drawn with replacement), and in the paper's accounting `baseline_1x`, one model's (the data
    set once an epoch: the paper's single model)."""
    start_ckpt, start_epoch = start
    paper = cfg.expert_epoch == "dataset"
    end, tune = start_epoch + cfg.expert_epochs, tune_epochs(cfg, cfg.expert_epochs)
    jobs = [Job("baseline", shards, experts * dataset_samples if paper else expert_samples, end, start_epoch,
                start_ckpt, fingerprint, tune, resampled=paper)]
    if paper:
        jobs.append(Job("baseline_1x", shards, dataset_samples, end, start_epoch, start_ckpt,
                        fingerprint + "-1x", tune))
    return jobs


def world_size(cfg: TrainConfig, local: int) -> int:
    """Trainer processes of one model: `local` GPUs (0 or 1: one process) on one host, or
    `gpus_per_expert` (one on a CPU) on each of `nodes_per_expert` hosts."""
    if cfg.nodes_per_expert > 1:
        return cfg.nodes_per_expert * (cfg.gpus_per_expert if local else 1)
    return max(1, local)


def samples_seen(cfg: TrainConfig, job: Job, num_samples: int, world_size: int) -> dict[str, int]:
    """{"masked": ..., "unmasked": ...}: the samples a job trains on, with and without patch dropout
    (whole batches per data-loader worker, as open_clip_train draws them)."""
    per_epoch = samples_per_epoch(num_samples, cfg.batch_size, cfg.workers, world_size)
    epochs = job.epochs - job.start_epoch
    unmasked = job.tune_epochs if cfg.patch_dropout > 0 else epochs
    return {"masked": (epochs - unmasked) * per_epoch, "unmasked": unmasked * per_epoch}


def seed_schedule_epochs(cfg: TrainConfig) -> int:
    """The length of the cosine schedule the seed trains in. `continued` (MoDE's reference): the seed
    is the first seed_epochs of one schedule that the experts and the baseline finish; `annealed`: a
    schedule of its own, ending at zero (the experts' restarts over the new total)."""
    return cfg.seed_epochs + cfg.expert_epochs if cfg.seed_schedule == "continued" else cfg.seed_epochs


