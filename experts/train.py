"""Stage 4, train: a seed CLIP on all data, then one expert per cluster.

The engine is open_clip's own trainer, `python -m open_clip_train.main`, run
as a subprocess; moda builds its command line, streams its log, and turns its
checkpoints into `local-dir` model folders (open_clip_config.json +
open_clip_model.safetensors) that `open_clip.create_model_and_transforms(
'local-dir:<folder>')` loads.

MoDE's recipe: every expert starts from the same seed checkpoint and resumes
it (weights, optimizer state, epoch counter), then trains only on its own
cluster's data for the remaining epochs. Experts are independent jobs.

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
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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
    require_manifest,
    write_manifest,
)
from experts.split import expert_dir_name, expert_shards

log = logging.getLogger("moda.train")
PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")


def model_config_dict(model: str) -> dict:
    """The open_clip architecture dict for a JSON path, a `local-dir:` folder or a built-in name."""
    import open_clip

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


def trainer_command(cfg: TrainConfig, *, model_spec: str, train_data: str, num_samples: int | None,
                    logs: Path, name: str, epochs: int, resume: str | None, device: str) -> list[str]:
    """The `open_clip_train.main` command line for one run (seed or expert)."""
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", model_spec,
        "--train-data", train_data,
        "--dataset-type", "webdataset",
        "--batch-size", str(cfg.batch_size),
        "--epochs", str(epochs),
        "--lr", str(cfg.lr),
        "--wd", str(cfg.weight_decay),
        "--warmup", str(cfg.warmup),
        "--workers", str(cfg.workers),
        "--precision", cfg.precision,
        "--seed", str(cfg.seed),
        "--logs", str(logs),
        "--name", name,
        "--save-frequency", "1",
        "--save-most-recent",
        "--zeroshot-frequency", "0",
        "--log-every-n-steps", "10",
        "--device", device,
    ]
    if num_samples is not None:
        cmd += ["--train-num-samples", str(num_samples)]
    if cfg.dataset_resampled:
        cmd += ["--dataset-resampled"]
    if resume:
        cmd += ["--resume", resume]
    return cmd + list(cfg.extra_args)


def run_trainer(cmd: list[str], log_file: Path, on_line: Callable[[str], None] | None = None) -> None:
    """Run the trainer, streaming its output to `log_file` and `on_line`; raise on failure."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with open(log_file, "a", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            if on_line is not None:
                on_line(line.rstrip())
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"open_clip_train exited with {code}; see {log_file}:\n" + "\n".join(tail))


def train_one(cfg: TrainConfig, *, name: str, stage_dir: Path, model_spec: str, model_cfg: dict,
              train_data: str, num_samples: int | None, epochs: int, start_from: Path | None,
              device: str, on_line: Callable[[str], None] | None, fingerprint: str) -> Path:
    """Train (or resume) one model to `epochs` total and export it; return the checkpoint.

    `fingerprint` identifies what this model is trained from (config, data,
    starting checkpoint). Checkpoints left by a run with another fingerprint
    are discarded; with the same one, a finished run is reused and a killed
    run continues from `epoch_latest.pt` (`--resume latest`). Otherwise the
    run starts from `start_from` (the seed's checkpoint for experts) or from
    scratch.
    """
    logs = stage_dir / "logs"
    run_logs = logs / name
    checkpoints = run_logs / "checkpoints"
    final = checkpoints / f"epoch_{epochs}.pt"
    marker = run_logs / "moda_fingerprint.txt"
    if not marker.is_file() or marker.read_text().strip() != fingerprint:
        shutil.rmtree(run_logs, ignore_errors=True)
    if not final.is_file():
        if (checkpoints / "epoch_latest.pt").is_file():
            resume = "latest"
        else:
            shutil.rmtree(run_logs, ignore_errors=True)  # the trainer refuses to reuse a name
            resume = str(start_from) if start_from else None
        cmd = trainer_command(cfg, model_spec=model_spec, train_data=train_data, num_samples=num_samples,
                              logs=logs, name=name, epochs=epochs, resume=resume, device=device)
        run_logs.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint + "\n")
        run_trainer(cmd, stage_dir / f"{name}.log", on_line)
        if not final.is_file():
            raise RuntimeError(f"open_clip_train finished without writing {final}; see {stage_dir / (name + '.log')}")
    export_checkpoint(final, model_cfg, stage_dir / name)
    return final


def given_seed(checkpoint: Path, model_cfg: dict, stage_dir: Path) -> tuple[Path, int]:
    """Use an existing trainer checkpoint as the seed: export it, return it and its epoch.

    A checkpoint with optimizer state and an epoch counter is resumed by every
    expert (MoDE's recipe); a bare state_dict gives weights only (epoch 0).
    """
    import torch

    if not checkpoint.is_file():
        raise FileNotFoundError(f"train.seed_checkpoint: {checkpoint} not found")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    epoch = int(state.get("epoch", 0)) if isinstance(state, dict) else 0
    export_checkpoint(checkpoint, model_cfg, stage_dir / "seed")
    return checkpoint.resolve(), epoch


def run_train(cfg: TrainConfig, split_dir: Path, cluster_dir: Path, stage_dir: Path,
              on_line: Callable[[str], None] | None = None) -> dict:
    started = time.time()
    upstream = require_manifest(split_dir, "split")
    config_hash = section_hash(cfg)
    model_cfg = model_config_dict(cfg.model)
    fingerprint = combine("train", config_hash, upstream["fingerprint"], model_cfg)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    arch_dir = stage_dir / "model_config"
    write_model_folder(arch_dir, model_cfg)
    model_spec = f"local-dir:{arch_dir.resolve()}"
    num_experts = upstream["num_experts"]
    shard_sets = [expert_shards(split_dir, e) for e in range(num_experts)]
    empty = [e for e, (_, sizes) in enumerate(shard_sets) if not sum(sizes.values())]
    if empty:
        raise ValueError(f"experts {empty} have no training samples in {split_dir}")
    few = [e for e, (paths, _) in enumerate(shard_sets) if len(paths) < cfg.workers]
    if few and not cfg.dataset_resampled:
        raise ValueError(
            f"experts {few} have fewer shards than train.workers={cfg.workers} (open_clip_train needs one "
            "per worker): raise split.min_shards, lower train.workers, or set train.dataset_resampled")

    # Seed: all experts' shards together (clean, deduplicated data). An epoch is
    # the number of distinct samples; out-of-cluster copies only add repeats.
    all_paths = [str(p.resolve()) for paths, _ in shard_sets for p in paths]
    expert_samples = sum(sum(sizes.values()) for _, sizes in shard_sets)
    all_samples = upstream["counts"].get("written", expert_samples)
    data_hashes = [file_sha256(split_dir / expert_dir_name(e) / "manifest.json") for e in range(num_experts)]
    run_key = combine(config_hash, model_cfg)
    seed_fp = combine("seed", run_key, data_hashes)
    t0 = time.time()
    if cfg.seed_checkpoint:
        seed_ckpt, seed_epochs = given_seed(Path(cfg.seed_checkpoint), model_cfg, stage_dir)
        seed_fp = combine("seed-given", run_key, file_sha256(seed_ckpt))
    else:
        seed_ckpt = train_one(cfg, name="seed", stage_dir=stage_dir, model_spec=model_spec, model_cfg=model_cfg,
                              train_data="::".join(all_paths), num_samples=all_samples,
                              epochs=cfg.seed_epochs, start_from=None, device=device, on_line=on_line,
                              fingerprint=seed_fp)
        seed_epochs = cfg.seed_epochs
    timings = {"seed": round(time.time() - t0, 2)}

    total_epochs = seed_epochs + cfg.expert_epochs
    expert_of_fine = _load_expert_of_fine(cluster_dir)
    registry_experts = []
    for e, (paths, sizes) in enumerate(shard_sets):
        name = expert_dir_name(e)
        pattern = "::".join(str(p.resolve()) for p in paths)  # counted by the folder's sizes.json
        t0 = time.time()
        ckpt = train_one(cfg, name=name, stage_dir=stage_dir, model_spec=model_spec, model_cfg=model_cfg,
                         train_data=pattern, num_samples=None, epochs=total_epochs, start_from=seed_ckpt,
                         device=device, on_line=on_line,
                         fingerprint=combine(name, run_key, seed_fp, data_hashes[e]))
        timings[name] = round(time.time() - t0, 2)
        registry_experts.append({
            "id": e,
            "model_dir": name,
            "fine_clusters": [s for s, owner in enumerate(expert_of_fine) if owner == e],
            "samples": sum(sizes.values()),
            "data_manifest_sha256": data_hashes[e],
            "checkpoint": str(ckpt.relative_to(stage_dir)),
            "seeded_from": "seed",
        })
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
        ckpt = train_one(cfg, name="baseline", stage_dir=stage_dir, model_spec=model_spec,
                         model_cfg=model_cfg, train_data="::".join(all_paths), num_samples=expert_samples,
                         epochs=total_epochs, start_from=seed_ckpt, device=device, on_line=on_line,
                         fingerprint=combine("baseline", run_key, seed_fp))
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
        counts={"experts": num_experts, "seed_samples": all_samples, "seconds_per_model": timings},
        started=started, extra={"device": device},
    )


def _load_expert_of_fine(cluster_dir: Path) -> list[int]:
    import numpy as np

    return np.load(cluster_dir / "expert_of_fine.npy").tolist()
