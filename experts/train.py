"""Stage 4, train: a seed CLIP on all data, then one expert per cluster.

The engine is open_clip's own trainer, `python -m open_clip_train.main`, run
as a subprocess; moda builds its command line, streams its log, and turns its
checkpoints into `local-dir` model folders (open_clip_config.json +
open_clip_model.safetensors) that `open_clip.create_model_and_transforms(
'local-dir:<folder>')` loads.

MoDE's recipe: every expert starts from the same seed checkpoint and resumes
it (weights, optimizer state, epoch counter), then trains only on its own
cluster's data for the remaining epochs. Experts are independent jobs.

Efficient-training switches (config `train`): bf16 autocast (`precision:
auto` picks amp_bf16 on a GPU), FLIP patch dropout with a final unmasked
tune (`patch_dropout`, `unmasked_tune_share`), LAMB with EVA-CLIP's betas
(`optimizer: lamb`), gradient checkpointing, torch.compile, local loss with
gathered gradients. Attention runs through PyTorch's fused SDPA kernels
(flash attention on a GPU), which open_clip's default blocks use.

Scheduling: the seed and the baseline use every visible GPU; experts run in
parallel, one per group of `gpus_per_expert` GPUs (CUDA_VISIBLE_DEVICES is
narrowed per run, within any mask the worker already has); on a CPU they run
one after another.

Outputs under the stage folder:
    model_config/open_clip_config.json   the architecture (no weights)
    logs/<name>/                          open_clip_train's logs and checkpoints
    seed/, expert_000/, ..., baseline/    exported local-dir models
                                          (baseline: the seed continued on all data for the
                                          experts' combined compute, the fair single model)
    registry.json                         what routing needs to use the experts
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipelines.devices import pick_device
from pipelines.config import TrainConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    file_sha256,
    is_done,
    read_manifest,
    remove_stale_temps,
    require_manifest,
    write_manifest,
)
from experts.launch import gpu_slots, run_trainer, trainer_command, visible_gpus
from experts.split import expert_dir_name, expert_shards

log = logging.getLogger("moda.train")
PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")


def model_config_dict(model: str) -> dict:
    """The open_clip architecture dict for a JSON path, a `local-dir:` folder or a built-in name.

    open_clip is imported only for a built-in name: the import takes seconds,
    and a rerun that skips the stage should not pay it.
    """
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"train.model: model config {path} not found")
        return json.loads(path.read_text(encoding="utf-8"))
    if model.startswith("local-dir:"):
        config = Path(model.removeprefix("local-dir:")) / "open_clip_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"train.model: {config} not found")
        return json.loads(config.read_text(encoding="utf-8"))["model_cfg"]
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"train.model: {model!r} is not an open_clip model, a .json config or local-dir:")
    return cfg


def write_model_folder(folder: Path, model_cfg: dict, state_dict=None) -> None:
    """A local-dir model folder; without `state_dict` it holds the architecture only."""
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        from safetensors.torch import save_file

        with atomic_path(folder / "open_clip_model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    atomic_write_json(folder / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": {}})


def export_checkpoint(checkpoint: Path, model_cfg: dict, folder: Path) -> None:
    """Trainer checkpoint (state_dict + optimizer) -> local-dir model folder."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state["state_dict"] if "state_dict" in state else state
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    write_model_folder(folder, model_cfg, weights)


@dataclass
class Job:
    """One model to train: from `start_from` (at `start_epoch`) to `epochs` in total."""

    name: str
    train_data: str
    num_samples: int | None
    epochs: int
    start_epoch: int
    start_from: Path | None
    fingerprint: str
    tune_epochs: int = 0  # final epochs without patch dropout (FLIP's unmasked tune)


def tune_epochs(cfg: TrainConfig, epochs: int) -> int:
    """How many of a run's last `epochs` are the unmasked tune (0 without patch dropout)."""
    if cfg.patch_dropout <= 0 or cfg.unmasked_tune_share <= 0:
        return 0
    return min(epochs, math.ceil(cfg.unmasked_tune_share * epochs))


def train_job(cfg: TrainConfig, job: Job, *, stage_dir: Path, model_spec: str, model_cfg: dict, device: str,
              gpus: list[str] | None, on_line: Callable[[str, str], None] | None) -> Path:
    """Train (or resume) one model and export it as a local-dir folder; return its final checkpoint.

    Checkpoints left by a run with another fingerprint are discarded; with the
    same one, a finished run is reused and a killed run continues from
    `epoch_latest.pt` (`--resume latest`), so its step counter continues.
    """
    logs = stage_dir / "logs"
    run_logs = logs / job.name
    checkpoints = run_logs / "checkpoints"
    marker = run_logs / "moda_fingerprint.txt"
    log_file = stage_dir / f"{job.name}.log"
    if not marker.is_file() or marker.read_text().strip() != job.fingerprint:
        shutil.rmtree(run_logs, ignore_errors=True)
        log_file.unlink(missing_ok=True)
    masked_until = job.epochs - job.tune_epochs
    phases = [(masked_until, False)] if masked_until > job.start_epoch else []
    if job.tune_epochs:
        phases.append((job.epochs, True))
    for target, unmasked in phases:
        if (checkpoints / f"epoch_{target}.pt").is_file():
            continue
        if ensure_latest(checkpoints):
            resume = "latest"
        else:
            shutil.rmtree(run_logs, ignore_errors=True)  # the trainer refuses to reuse a name
            resume = str(job.start_from) if job.start_from else None
        cmd = trainer_command(cfg, model_spec=model_spec, train_data=job.train_data,
                              num_samples=job.num_samples, logs=logs, name=job.name, epochs=target,
                              resume=resume, device=device, unmasked=unmasked,
                              nproc=max(1, len(gpus or [])))
        run_logs.mkdir(parents=True, exist_ok=True)
        marker.write_text(job.fingerprint + "\n")
        run_trainer(cmd, log_file, gpus, None if on_line is None else (lambda line: on_line(job.name, line)))
        if not (checkpoints / f"epoch_{target}.pt").is_file():
            raise RuntimeError(f"open_clip_train finished without writing epoch_{target}.pt; see {log_file}")
    final = checkpoints / f"epoch_{job.epochs}.pt"
    export_checkpoint(final, model_cfg, stage_dir / job.name)
    return final


def ensure_latest(checkpoints: Path) -> bool:
    """Make `epoch_latest.pt` the newest complete checkpoint; False when there is none.

    open_clip_train writes `epoch_latest.pt` atomically, but `epoch_N.pt`
    directly and first: a run killed between the two leaves only `epoch_N.pt`
    (and one killed while saving leaves a truncated one, skipped here).
    """
    import torch

    latest = checkpoints / "epoch_latest.pt"
    numbered = sorted(checkpoints.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    newest_number = int(numbered[-1].stem.split("_")[1]) if numbered else -1
    if latest.is_file():
        try:
            if torch.load(latest, map_location="cpu", weights_only=False)["epoch"] >= newest_number:
                return True
        except Exception:
            latest.unlink()
    for candidate in reversed(numbered):
        try:
            torch.load(candidate, map_location="cpu", weights_only=False)
        except Exception:
            candidate.unlink()
            continue
        tmp = checkpoints / ".epoch_latest.pt.tmp"
        shutil.copyfile(candidate, tmp)
        tmp.replace(latest)
        return True
    return False


class ExpertTask:
    """Train one expert; a picklable callable, so a Dask worker on another host can run it.

    Called with a GPU slot (run_on_slots) or with none (`slot` given up front,
    for Dask); returns (final checkpoint, {"seconds", "host"}).
    """

    def __init__(self, cfg: TrainConfig, job: Job, common: dict, slot: list[str] | None = None):
        self.cfg, self.job, self.common, self.slot = cfg, job, common, slot
        self.__name__ = job.name

    def __call__(self, slot: list[str] | None = None) -> tuple[Path, dict]:
        import os
        import socket

        slot = self.slot if slot is None else slot
        started = time.time()
        ckpt = train_job(self.cfg, self.job, gpus=slot or None, **self.common)
        return ckpt, {"seconds": round(time.time() - started, 2), "host": f"{socket.gethostname()}:{os.getpid()}"}


def run_on_slots(jobs: list[Callable[[list[str]], Path]], slots: list[list[str]],
                 runner: Callable[[list[Callable[[], Path]], int], list[Path]]) -> list[Path]:
    """Run jobs so that each holds one GPU slot while it runs: at most len(slots) at once."""
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def hold_slot(job: Callable[[list[str]], Path]) -> Callable[[], Path]:
        def run() -> Path:
            slot = free.get()
            try:
                return job(slot)
            finally:
                free.put(slot)
        run.__name__ = getattr(job, "__name__", "job")
        return run

    return runner([hold_slot(job) for job in jobs], len(slots))


def run_parallel(tasks: list[Callable[[], Path]], workers: int) -> list[Path]:
    """Default runner: a thread per concurrent model (the work happens in subprocesses)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda task: task(), tasks))


def given_seed(source: Path, model_cfg: dict, stage_dir: Path) -> tuple[Path, int]:
    """Use an existing model as the seed: export it, return a checkpoint to start from and its epoch.

    An open_clip_train checkpoint (optimizer state, epoch counter) is resumed
    by every expert, MoDE's recipe. A bare state_dict file or a `local-dir`
    model folder (open_clip_model.safetensors) gives weights only (epoch 0).
    """
    import torch

    if source.is_dir():
        from safetensors.torch import load_file

        weights = source / "open_clip_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"train.seed_checkpoint: {weights} not found (a local-dir model folder?)")
        bare = stage_dir / "seed_init.pt"
        with atomic_path(bare) as tmp:
            torch.save(load_file(str(weights)), tmp)
        source = bare
    if not source.is_file():
        raise FileNotFoundError(f"train.seed_checkpoint: {source} not found")
    state = torch.load(source, map_location="cpu", weights_only=False)
    epoch = int(state.get("epoch", 0)) if isinstance(state, dict) else 0
    export_checkpoint(source, model_cfg, stage_dir / "seed")
    return source.resolve(), epoch


def weights_only(checkpoint: Path, stage_dir: Path) -> Path:
    """The seed's weights without optimizer state or epoch: experts start a fresh schedule."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    bare = stage_dir / "seed_weights.pt"
    with atomic_path(bare) as tmp:
        weights = state["state_dict"] if "state_dict" in state else state
        torch.save({k.removeprefix("module."): v for k, v in weights.items()}, tmp)
    return bare


def train_fingerprint(cfg: TrainConfig, split_dir: Path) -> tuple[str, dict]:
    """(fingerprint, open_clip model config with FLIP's patch dropout): config, architecture, split."""
    upstream = require_manifest(split_dir, "split")
    model_cfg = model_config_dict(cfg.model)
    if cfg.patch_dropout > 0:
        model_cfg = {**model_cfg, "vision_cfg": {**model_cfg["vision_cfg"], "patch_dropout": cfg.patch_dropout}}
    return combine("train", section_hash(cfg), upstream["fingerprint"], model_cfg), model_cfg


def run_train(cfg: TrainConfig, split_dir: Path, cluster_dir: Path, stage_dir: Path,
              on_line: Callable[[str, str], None] | None = None,
              runner: Callable[[list[Callable[[], Path]], int], list[Path]] = run_parallel) -> dict:
    """Seed, experts (in parallel across GPU slots) and baseline; registry and manifest.

    `runner(tasks, concurrency)` runs the expert tasks and returns their
    checkpoints in order; the Prefect flow passes one that makes each expert
    a Prefect task.
    """
    started = time.time()
    upstream = require_manifest(split_dir, "split")
    config_hash = section_hash(cfg)
    fingerprint, model_cfg = train_fingerprint(cfg, split_dir)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    for folder in [stage_dir, *stage_dir.glob("*/")]:  # what a killed run was writing (registry, models)
        remove_stale_temps(folder)
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    gpus = visible_gpus() if device == "cuda" else []
    slots = gpu_slots(gpus, cfg.gpus_per_expert)
    arch_dir = stage_dir / "model_config"
    write_model_folder(arch_dir, model_cfg)
    model_spec = f"local-dir:{arch_dir.resolve()}"
    num_experts = upstream["num_experts"]
    shard_sets = [expert_shards(split_dir, e) for e in range(num_experts)]
    empty = [e for e, (_, sizes) in enumerate(shard_sets) if not sum(sizes.values())]
    if empty:
        raise ValueError(f"experts {empty} have no training samples in {split_dir}")
    needed = cfg.workers * max(1, cfg.gpus_per_expert if gpus else 1)
    few = [e for e, (paths, _) in enumerate(shard_sets) if len(paths) < needed]
    if few and not cfg.dataset_resampled:
        raise ValueError(
            f"experts {few} have fewer shards than the {needed} data loaders (train.workers x GPUs) "
            "open_clip_train needs: raise split.min_shards, lower train.workers, or set "
            "train.dataset_resampled")
    common = dict(stage_dir=stage_dir, model_spec=model_spec, model_cfg=model_cfg, device=device,
                  on_line=on_line)

    # Seed: all experts' shards together (clean, deduplicated data). An epoch is
    # the number of distinct samples; out-of-cluster copies only add repeats.
    all_paths = [str(p.resolve()) for paths, _ in shard_sets for p in paths]
    expert_samples = sum(sum(sizes.values()) for _, sizes in shard_sets)
    all_samples = upstream["counts"].get("written", expert_samples)
    data_hashes = [file_sha256(split_dir / expert_dir_name(e) / "manifest.json") for e in range(num_experts)]
    run_key = combine(config_hash, model_cfg)
    t0 = time.time()
    if cfg.seed_checkpoint:
        seed_ckpt, seed_epochs = given_seed(Path(cfg.seed_checkpoint), model_cfg, stage_dir)
        seed_fp = combine("seed-given", run_key, file_sha256(seed_ckpt))
    else:
        seed_fp = combine("seed", run_key, data_hashes)
        seed_epochs = cfg.seed_epochs
        seed_job = Job("seed", "::".join(all_paths), all_samples, seed_epochs, 0, None, seed_fp)
        seed_ckpt = train_job(cfg, seed_job, gpus=gpus or None, **common)
    timings = {"seed": round(time.time() - t0, 2)}
    ran_on: dict[str, str] = {}

    if cfg.expert_init == "weights":  # fresh short schedule from the seed's weights
        start_ckpt, start_epoch = weights_only(seed_ckpt, stage_dir), 0
    else:  # MoDE: resume the seed's optimizer state and LR schedule
        start_ckpt, start_epoch = seed_ckpt, seed_epochs
    total_epochs = start_epoch + cfg.expert_epochs
    tune = tune_epochs(cfg, cfg.expert_epochs)
    jobs = [Job(expert_dir_name(e), "::".join(str(p.resolve()) for p in paths), None, total_epochs,
                start_epoch, start_ckpt, combine(expert_dir_name(e), run_key, seed_fp, data_hashes[e]), tune)
            for e, (paths, _) in enumerate(shard_sets)]
    if cfg.executor == "dask" and runner is not run_parallel:  # a Dask runner from the Prefect flow
        # Each expert a task on a Dask worker (any host sharing the run folder); the
        # worker's own CUDA_VISIBLE_DEVICES and its GPU resource place it, so no local
        # slot is held, and the trainer's lines go to its log file only.
        remote = {**common, "on_line": None}
        tasks = [ExpertTask(cfg, job, remote, slot=[]) for job in jobs]
        done = runner(tasks, len(tasks))
    else:
        done = run_on_slots([ExpertTask(cfg, job, common) for job in jobs], slots, runner)
    checkpoints = [ckpt for ckpt, _ in done]
    for job, (_, ran) in zip(jobs, done):
        timings[job.name] = ran["seconds"]
        ran_on[job.name] = ran["host"]
    expert_of_fine = _load_expert_of_fine(cluster_dir)
    registry_experts = [{
        "id": e,
        "model_dir": job.name,
        "fine_clusters": [s for s, owner in enumerate(expert_of_fine) if owner == e],
        "samples": sum(shard_sets[e][1].values()),
        "data_manifest_sha256": data_hashes[e],
        "checkpoint": str(ckpt.relative_to(stage_dir)),
        "seeded_from": "seed",
    } for e, (job, ckpt) in enumerate(zip(jobs, checkpoints))]
    registry = {
        "seed": {"model_dir": "seed", "checkpoint": str(seed_ckpt.resolve()),
                 "samples": None if cfg.seed_checkpoint else all_samples, "epochs": seed_epochs},
        "experts": registry_experts,
        "baseline": None,
        "cluster": str(cluster_dir.resolve()),
        "epochs_total": total_epochs,
    }
    if cfg.baseline:
        # The fair single model: the seed continued on all data for as many samples as
        # all experts together saw (expert_epochs passes over the union of their data).
        t0 = time.time()
        job = Job("baseline", "::".join(all_paths), expert_samples, total_epochs, start_epoch, start_ckpt,
                  combine("baseline", run_key, seed_fp), tune)
        ckpt = train_job(cfg, job, gpus=gpus or None, **common)
        timings["baseline"] = round(time.time() - t0, 2)
        registry["baseline"] = {"model_dir": "baseline", "checkpoint": str(ckpt.relative_to(stage_dir)),
                                "samples": expert_samples, "seeded_from": "seed"}
    atomic_write_json(stage_dir / "registry.json", registry)
    outputs = {"registry.json": file_sha256(stage_dir / "registry.json")}
    models = ["seed"] + [x["model_dir"] for x in registry_experts] + (["baseline"] if cfg.baseline else [])
    for name in models:
        for file in ("open_clip_config.json", "open_clip_model.safetensors"):
            outputs[f"{name}/{file}"] = file_sha256(stage_dir / name / file)
    return write_manifest(
        stage_dir, stage="train", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"split": upstream["fingerprint"]}, outputs=outputs,
        counts={"experts": num_experts, "seed_samples": all_samples, "seconds_per_model": timings,
                "experts_ran_on": ran_on},
        started=started, extra={"device": device, "gpu_slots": slots},
    )


def _load_expert_of_fine(cluster_dir: Path) -> list[int]:
    import numpy as np

    return np.load(cluster_dir / "expert_of_fine.npy").tolist()
