"""Stage 4, train: a seed CLIP on all data, then one expert per cluster, and the fair baseline.

The engine is open_clip's own trainer (experts/launch.py runs it as a
subprocess); moda builds its command lines, streams its log, and turns its
checkpoints into `local-dir` model folders (experts/models.py) that
`open_clip.create_model_and_transforms('local-dir:<folder>')` loads.

MoDE's recipe: every expert starts from the same seed checkpoint and resumes
it (weights, optimizer state, epoch counter), then trains only on its own
cluster's data for the remaining epochs. Experts are independent jobs.

Efficient-training switches (config `train`): bf16 autocast (`precision:
auto` picks amp_bf16 on a GPU), FLIP patch dropout with a final unmasked
tune (`patch_dropout`, `unmasked_tune_share`), LAMB with EVA-CLIP's betas
(`optimizer: lamb`), gradient checkpointing, torch.compile, local loss with
gathered gradients. Attention runs through PyTorch's fused SDPA kernels, which
open_clip's default blocks use: the image tower (no mask) can take the flash
kernel on a GPU; the text tower passes an additive causal mask, which the flash
kernel does not accept, so it runs the memory-efficient kernel (bench/gpu's
profile names the kernel each tower ran).

Scheduling: the seed and the baseline use every visible GPU; experts run in
parallel, one per group of `gpus_per_expert` GPUs (CUDA_VISIBLE_DEVICES is
narrowed per run, within any mask the worker already has); on a CPU they run
one after another. The caller's hooks may run the experts as Prefect tasks or
on a Dask cluster (pipelines/run/executors.py).

Outputs under the stage folder (pipelines/core/layout.py):
    model_config/      the architecture (no weights)
    logs/<name>/       open_clip_train's logs and checkpoints
    seed/, expert_000/, ..., baseline/    exported local-dir models (baseline: the seed
                       continued on all data for the experts' combined compute, the fair single model)
    registry.json      what routing needs to use the experts
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experts.budget import check_disk, loader_advice, train_disk_need
from experts.flops import flops_per_sample, parameter_count
from experts.jobs import (
    Job,
    baseline_jobs,
    expert_job,
    samples_seen,
    seed_schedule_epochs,
    world_size,
)
from experts.launch import compile_cache_env, gpu_slots, run_gpus, run_trainer, trainer_command, trainer_device
from experts.models import (
    WEIGHTS_FILE,
    ensure_latest,
    export_checkpoint,
    given_seed,
    model_config_dict,
    model_files,
    newest_epoch,
    prune_checkpoints,
    weights_only,
    write_model_folder,
)
from experts.pretrained import run_architecture, seed_preprocess
from experts.shard_sets import check_shard_counts, shard_set, shard_set_fingerprint
from pipelines.core.config import TrainConfig, section_hash
from pipelines.core.devices import cpu_threads, is_cuda, pick_device, usable_cores
from pipelines.core.layout import RunLayout, expert_name
from pipelines.core.manifest import atomic_write_json, combine, file_sha256, remove_stale_temps
from pipelines.core.stage import TRAINS, Fingerprint, Hooks, Stage, StageContext, StageResult
from pipelines.shardio.brace import compact_shards

PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")


def line_hook(name: str, hooks: Hooks) -> Callable[[str], None] | None:
    """The trainer's log lines of model `name` to the caller: every line, and its progress."""
    if hooks.on_line is None and hooks.on_progress is None:
        return None

    def on_line(line: str) -> None:
        if hooks.on_line is not None:
            hooks.on_line(name, line)
        match = PROGRESS.search(line) if hooks.on_progress is not None else None
        if match:
            hooks.on_progress(name, int(match.group(2)) / max(1, int(match.group(3))))
    return on_line


def train_job(cfg: TrainConfig, job: Job, *, layout: RunLayout, model_spec: str, model_cfg: dict, device: str,
              gpus: list[str] | None, hooks: Hooks = Hooks()) -> Path:
    """Train (or resume) one model and export it as a local-dir folder; return its final checkpoint.

    Checkpoints left by a run with another fingerprint are discarded; with the
    same one, a finished run is reused and a killed run continues from
    `epoch_latest.pt` (`--resume latest`), so its step counter continues.
    """
    run_logs, checkpoints = layout.run_logs(job.name), layout.checkpoints(job.name)
    marker, log_file = layout.job_marker(job.name), layout.trainer_log(job.name)
    if not marker.is_file() or marker.read_text().strip() != job.fingerprint:
        shutil.rmtree(run_logs, ignore_errors=True)
        log_file.unlink(missing_ok=True)
    # Over several nodes, each runs `gpus_per_expert` trainer processes (one on a CPU) on the GPUs
    # its launcher gave it; on one, the model takes the GPUs of its slot.
    nodes = cfg.nodes_per_expert
    per_node = (cfg.gpus_per_expert if is_cuda(device) else 1) if nodes > 1 else max(1, len(gpus or []))
    masked_until = job.epochs - job.tune_epochs
    phases = [(masked_until, False)] if masked_until > job.start_epoch else []
    if job.tune_epochs:
        phases.append((job.epochs, True))
    for target, unmasked in phases:
        if newest_epoch(checkpoints) >= target:  # this part is done (its own file may be pruned since)
            continue
        if ensure_latest(checkpoints):
            resume = "latest"
        else:
            shutil.rmtree(run_logs, ignore_errors=True)  # the trainer refuses to reuse a name
            resume = str(job.start_from) if job.start_from else None
        # Every launch of a job is part of the one schedule: the masked epochs and the unmasked
        # tune continue the same cosine (open_clip_train sizes it over --epochs).
        rendezvous = layout.train / "rendezvous" / f"{job.name}-{secrets.token_hex(6)}" if nodes > 1 else None
        # a model keeping earlier epochs (the seed, for other expert phases) keeps every epoch while it trains
        launch_cfg = dataclasses.replace(cfg, keep_checkpoints="all") if job.keep else cfg
        cmd = trainer_command(launch_cfg, model_spec=model_spec, train_data=job.train_data,
                              num_samples=job.num_samples, logs=layout.train_logs, name=job.name,
                              epochs=job.schedule_epochs, resume=resume, device=device, unmasked=unmasked,
                              nproc=per_node, stop_after=target, rendezvous=rendezvous, resampled=job.resampled)
        run_logs.mkdir(parents=True, exist_ok=True)
        marker.write_text(job.fingerprint + "\n")
        # On a CPU the one model training at a time gets every usable core, whatever the environment
        # (shared by the node processes when they all run on this host).
        local_nodes = nodes if not cfg.node_launcher else 1
        threads = max(1, cpu_threads() // local_nodes) if device == "cpu" else None
        try:
            run_trainer(cmd, log_file, gpus if nodes == 1 else None, line_hook(job.name, hooks), threads,
                        compile_cache_env(layout.train / "compile_cache") if cfg.torchcompile else None)
        finally:
            if rendezvous is not None:
                rendezvous.unlink(missing_ok=True)
        if not layout.checkpoint(job.name, target).is_file():
            raise RuntimeError(f"open_clip_train finished without writing epoch_{target}.pt; see {log_file}")
    final = layout.checkpoint(job.name, job.epochs)
    export_checkpoint(final, model_spec, layout.model(job.name))
    if cfg.keep_checkpoints == "needed":
        prune_checkpoints(checkpoints, job.epochs, job.keep)
    return final


class ExpertTask:
    """Train one expert; a picklable callable, so a Dask worker on another host can run it.

    Called with a GPU slot (run_on_slots) or with none (`slot` given up front,
    for Dask); returns (final checkpoint, {"seconds", "host"}).
    """

    def __init__(self, cfg: TrainConfig, job: Job, common: dict, slot: list[str] | None = None):
        self.cfg, self.job, self.common, self.slot = cfg, job, common, slot
        self.__name__ = job.name

    def __call__(self, slot: list[str] | None = None) -> tuple[Path, dict]:
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


def expert_start(cfg: TrainConfig, seed_ckpt: Path, seed_epochs: int, layout: RunLayout) -> tuple[Path, int]:
    """(checkpoint, epoch) every expert starts from: the seed resumed (MoDE: its optimizer state and
    LR schedule continue), or its weights only for a fresh schedule (`expert_init: weights`)."""
    if cfg.expert_init == "weights":
        return weights_only(seed_ckpt, layout.seed_weights), 0
    return seed_ckpt, seed_epochs


def model_config(cfg: TrainConfig) -> dict:
    """The open_clip architecture (`train.model`'s or a pretrained seed's) with FLIP's patch dropout."""
    model_cfg = run_architecture(model_config_dict(cfg.model), cfg.model, TrainConfig.model, cfg.seed_checkpoint)
    if cfg.patch_dropout > 0:
        model_cfg = {**model_cfg, "vision_cfg": {**model_cfg["vision_cfg"], "patch_dropout": cfg.patch_dropout}}
    return model_cfg


def fingerprint(ctx: StageContext) -> Fingerprint:
    """Config (result-changing fields), architecture, and the split's fingerprint."""
    model_cfg = model_config(ctx.section)
    config_hash = section_hash(ctx.section)
    split_fp = ctx.upstream["split"]["fingerprint"]
    return Fingerprint(combine("train", config_hash, split_fp, model_cfg), config_hash, {"split": split_fp},
                       {"model_cfg": model_cfg})


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    """Seed, experts (in parallel across GPU slots, or as the hooks' runner places them) and baseline;
    the registry."""
    cfg: TrainConfig = ctx.section
    layout, hooks, model_cfg = ctx.layout, ctx.hooks, fp.details["model_cfg"]
    split = ctx.upstream["split"]
    device = pick_device(cfg.device)
    gpus = run_gpus(device, cfg.gpus)
    device = trainer_device(device)
    slots = gpu_slots(gpus, cfg.gpus_per_expert, cfg.models_per_gpu)
    write_model_folder(layout.model_config, model_cfg, preprocess_cfg=seed_preprocess(cfg.seed_checkpoint))
    model_spec = f"local-dir:{layout.model_config.resolve()}"
    num_experts = split["num_experts"]
    shard_sets = [shard_set(layout.expert_shards(e)) for e in range(num_experts)]
    empty = [e for e, (_, sizes) in enumerate(shard_sets) if not sum(sizes.values())]
    if empty:
        raise ValueError(f"experts {empty} have no training samples in {layout.split}")
    expert_world = world_size(cfg, cfg.gpus_per_expert if gpus else 1)
    check_shard_counts(cfg, {expert_name(e): list(sizes.values()) for e, (_, sizes) in enumerate(shard_sets)},
                       expert_world)
    common = dict(layout=layout, model_spec=model_spec, model_cfg=model_cfg, device=device, hooks=hooks)
    names = ([] if cfg.seed_checkpoint else ["seed"]) + [expert_name(e) for e in range(num_experts)] \
        + (["baseline"] if cfg.baseline else [])
    left = [n for n in names if not (layout.model(n) / WEIGHTS_FILE).is_file()]
    need = train_disk_need(parameter_count(model_cfg), len(left), cfg.seed_epochs + cfg.expert_epochs,
                           len(slots), cfg.keep_checkpoints) if left else 0
    tqdm.write(f"train: {len(left)} of {len(names)} models to train; "
               + check_disk(layout.train, need, "their checkpoints and exported models"))
    advice = loader_advice(cfg.workers, len(slots), usable_cores()) if gpus and left else None
    if advice:
        tqdm.write(f"train: {advice}")

    # Seed: all experts' shards together; an epoch is the distinct samples (out-of-cluster copies repeat).
    all_paths = [str(p.resolve()) for paths, _ in shard_sets for p in paths]
    expert_samples = sum(sum(sizes.values()) for _, sizes in shard_sets)
    all_samples = split["counts"].get("written", expert_samples)
    data_hashes = [shard_set_fingerprint(layout.expert_shards(e)) for e in range(num_experts)]
    run_key = combine(fp.config_hash, model_cfg)
    t0 = time.time()
    if cfg.seed_checkpoint:
        seed_ckpt, seed_epochs = given_seed(cfg.seed_checkpoint, layout)
        seed_fp = combine("seed-given", run_key, file_sha256(seed_ckpt))
    else:
        seed_fp = combine("seed", run_key, data_hashes)
        seed_epochs = cfg.seed_epochs
        seed_job = Job("seed", compact_shards(all_paths), all_samples, seed_epochs, 0, None, seed_fp,
                       schedule=seed_schedule_epochs(cfg), keep=tuple(sorted(cfg.keep_seed_epochs)))
        seed_ckpt = train_job(cfg, seed_job, gpus=gpus or None, **common)
    timings = {"seed": round(time.time() - t0, 2)}
    ran_on: dict[str, str] = {}
    world = world_size(cfg, len(gpus))
    seen = {} if cfg.seed_checkpoint else {"seed": samples_seen(cfg, seed_job, all_samples, world)}

    start = expert_start(cfg, seed_ckpt, seed_epochs, layout)
    jobs = [expert_job(cfg, expert_name(e), paths, start,
                       combine(expert_name(e), run_key, seed_fp, data_hashes[e]), all_samples)
            for e, (paths, _) in enumerate(shard_sets)]
    if hooks.distributed:
        # Each expert a task on a worker of the caller's cluster (any host sharing the run
        # folder); the worker's own CUDA_VISIBLE_DEVICES places it, so no local slot is held,
        # and the trainer's lines go to its log file only.
        remote = {**common, "hooks": Hooks()}
        done = hooks.runner([ExpertTask(cfg, job, remote, slot=[]) for job in jobs], len(jobs))
    else:
        done = run_on_slots([ExpertTask(cfg, job, common) for job in jobs], slots, hooks.runner or run_parallel)
    checkpoints = [ckpt for ckpt, _ in done]
    for job, (_, ran), (_, sizes) in zip(jobs, done, shard_sets):
        timings[job.name] = ran["seconds"]
        ran_on[job.name] = ran["host"]
        seen[job.name] = samples_seen(cfg, job, job.num_samples or sum(sizes.values()), expert_world)
    expert_of_fine = np.load(layout.expert_of_fine).tolist()
    registry_experts = [{
        "id": e,
        "model_dir": job.name,
        "fine_clusters": [s for s, owner in enumerate(expert_of_fine) if owner == e],
        "samples": sum(shard_sets[e][1].values()),
        "data_manifest_sha256": data_hashes[e],
        "checkpoint": str(ckpt.relative_to(layout.train)),
        "seeded_from": "seed",
    } for e, (job, ckpt) in enumerate(zip(jobs, checkpoints))]
    registry = {
        "seed": {"model_dir": "seed", "checkpoint": str(seed_ckpt.resolve()),
                 "samples": None if cfg.seed_checkpoint else all_samples, "epochs": seed_epochs},
        "experts": registry_experts,
        "baseline": None,
        "cluster": str(layout.cluster.resolve()),
        "epochs_total": start[1] + cfg.expert_epochs,
        "trainer_seed": cfg.seed, "seed_schedule": cfg.seed_schedule,
    }
    singles = baseline_jobs(cfg, compact_shards(all_paths), start, num_experts, expert_samples, all_samples,
                            combine("baseline", run_key, seed_fp)) if cfg.baseline else []
    for job in singles:  # the fair single model(s): the seed continued on all data (experts/jobs.py)
        t0 = time.time()
        ckpt = train_job(cfg, job, gpus=gpus or None, **common)
        timings[job.name] = round(time.time() - t0, 2)
        seen[job.name] = samples_seen(cfg, job, job.num_samples, world)
        registry[job.name] = {"model_dir": job.name, "checkpoint": str(ckpt.relative_to(layout.train)),
                              "samples": job.num_samples, "seeded_from": "seed"}
    atomic_write_json(layout.registry, registry)
    models = ["seed"] + [x["model_dir"] for x in registry_experts] + [job.name for job in singles]
    outputs = {str(f.relative_to(layout.train)): file_sha256(f)
               for f in [layout.registry] + [f for name in models for f in model_files(layout.model(name))]}
    return StageResult(
        outputs=outputs,
        counts={"experts": num_experts, "seed_samples": all_samples, "seconds_per_model": timings,
                "experts_ran_on": ran_on, "samples_seen": seen,
                "flops_per_sample": flops_per_sample(model_cfg, cfg.batch_size)},
        extra={"device": device, "gpu_slots": slots},
    )


def clean(stage_dir: Path) -> int:
    """What a killed run was writing: temporary files in the stage folder and its model folders."""
    return sum(remove_stale_temps(folder) for folder in [stage_dir, *stage_dir.glob("*/")])


STAGE = Stage(name="train", section="train", reads=("split",), fingerprint=fingerprint, work=work, clean=clean,
              on_cluster=True, places_runs=True, role=TRAINS)
