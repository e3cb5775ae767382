"""Launching open_clip_train: command lines, GPU slots, and the trainer process.

moda does not train; it builds the command a person would type for
`python -m open_clip_train.main` (or `torchrun --nproc_per_node N -m
open_clip_train.main` for several GPUs per model), pins each run to its own
GPUs through CUDA_VISIBLE_DEVICES, and streams the trainer's output. The
module it runs is `experts.trainer_main`: open_clip_train's own `main` with
its one unseeded random source (webdataset's sample shuffle) seeded, so the
same config gives the same model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from experts.nodes import RENDEZVOUS
from experts.trainer_main import STOP_FLAG
from pipelines.core.config import TrainConfig
from pipelines.core.devices import device_gpus, is_cuda

TRAINER = "experts.trainer_main"  # open_clip_train.main with its sample shuffle seeded
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, found without the venv on PATH
# The trainer's flags follow `--` under torchrun: its parser rejects a flag that is a prefix of one
# of its own (`--logs` of `--logs-specs`) even after the script's name; trainer_main drops the `--`.


def visible_gpus(env: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """GPU ids this process may use: the CUDA_VISIBLE_DEVICES mask when set, else all."""
    env = os.environ if env is None else env
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [g.strip() for g in mask.split(",") if g.strip() and g.strip() != "-1"]
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def gpu_slots(gpus: list[str], per_model: int, models_per_gpu: int = 1) -> list[list[str]]:
    """Groups of `per_model` GPUs, each listed `models_per_gpu` times: how many models can train at
    once, and where (a slot is held by one model while it trains).

    Disjoint groups, one model each, unless `models_per_gpu` > 1 packs several small models on each
    GPU (round-robin over the GPUs, so the first models spread before any GPU takes a second).
    No GPU: one CPU slot (an empty group), so models run one after another.
    """
    if not gpus:
        return [[]]
    if per_model > len(gpus):
        raise ValueError(f"train.gpus_per_expert={per_model} but only {len(gpus)} GPU(s) visible: {gpus}")
    if models_per_gpu > 1 and per_model > 1:
        raise ValueError(f"train.models_per_gpu={models_per_gpu} packs one-GPU models; with "
                         f"train.gpus_per_expert={per_model} set models_per_gpu to 1")
    groups = [gpus[i:i + per_model] for i in range(0, len(gpus) - per_model + 1, per_model)]
    return [list(group) for _ in range(max(1, models_per_gpu)) for group in groups]


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """`auto`: bf16 autocast on a GPU (stable for large CLIPs), fp32 on a CPU (bf16 is slow there)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if is_cuda(device) else "fp32"


def allowed_gpus(visible: list[str], allowed: list[str]) -> list[str]:
    """The visible GPUs this run may use (`train.gpus`; empty: all); an id not visible is an error."""
    if not allowed:
        return visible
    unknown = [g for g in allowed if g not in visible]
    if unknown:
        raise ValueError(f"train.gpus {allowed}: {unknown} not among the visible GPUs {visible} "
                         "(CUDA_VISIBLE_DEVICES, or the one GPU of train.device cuda:N): list visible ids, "
                         "or leave train.gpus empty for all")
    return list(allowed)


def run_gpus(device: str, allowed: list[str] = (), visible: list[str] | None = None) -> list[str]:
    """The GPU ids a run on `device` trains on: none on a CPU; every visible one for `cuda`; the N-th
    visible one for `cuda:N` (torch's numbering inside CUDA_VISIBLE_DEVICES); narrowed to `train.gpus`
    when it lists some. The trainer is then told `--device cuda` with CUDA_VISIBLE_DEVICES set to its
    slot, so an explicit `cuda:N` trains in bf16 on that GPU, as `cuda` does on all."""
    if not is_cuda(device):
        return []
    return allowed_gpus(device_gpus(device, visible_gpus() if visible is None else visible), list(allowed))


def trainer_device(device: str) -> str:
    """What the trainer is told: `cuda` for any GPU (its CUDA_VISIBLE_DEVICES holds its slot), else
    the device as given."""
    return "cuda" if is_cuda(device) else device


def trainer_command(cfg: TrainConfig, *, model_spec: str, train_data: str, num_samples: int | None,
                    logs: Path, name: str, epochs: int, resume: str | None, device: str,
                    unmasked: bool = False, nproc: int = 1, stop_after: int | None = None, resampled: bool = False,
                    rendezvous: Path | None = None) -> list[str]:
    """The open_clip_train command line for one run (seed, expert or baseline).

    `epochs`: the length of the schedule the run is part of (open_clip_train sizes its cosine over
    it); `stop_after`: the epoch this launch ends at, when before the schedule's end. With
    `train.nodes_per_expert` above 1, `rendezvous` is the file the nodes of this launch agree on
    their endpoint through (`experts.nodes`), and the command starts them all.
    """
    if cfg.nodes_per_expert > 1:
        if rendezvous is None:
            raise ValueError("a launch over several nodes needs its rendezvous file")
        launcher = node_launcher(cfg, rendezvous) + TORCHRUN + [
            f"--nnodes={cfg.nodes_per_expert}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
            f"--rdzv_id={rendezvous.name}", RENDEZVOUS, "-m", TRAINER, "--"]
    elif nproc > 1:
        launcher = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", "-m", TRAINER, "--"]
    else:
        launcher = [sys.executable, "-m", TRAINER]
    cmd = launcher + [
        "--model", model_spec,
        "--train-data", train_data,
        "--dataset-type", "webdataset",
        "--batch-size", str(cfg.batch_size),
        "--epochs", str(epochs),
        "--lr", str(cfg.lr),
        "--wd", str(cfg.weight_decay),
        "--beta1", str(cfg.beta1),
        "--beta2", str(cfg.beta2),
        "--eps", str(cfg.eps),
        "--warmup", str(cfg.warmup),
        "--workers", str(cfg.workers),
        "--precision", resolve_precision(cfg, device),
        "--seed", str(cfg.seed),
        "--logs", str(logs),
        "--name", name,
        "--save-frequency", "1",
        "--save-most-recent",
        "--zeroshot-frequency", "0",
        "--log-every-n-steps", "10",
        "--device", device,
        "--report-to", "tensorboard",
    ]
    if cfg.keep_checkpoints == "needed":  # each epoch's file replaces its predecessor's (train.prune_checkpoints)
        cmd += ["--delete-previous-checkpoint"]
    if cfg.optimizer == "lamb":
        cmd += ["--opt", "timm/lamb"]
    if num_samples is not None:
        cmd += ["--train-num-samples", str(num_samples)]
    if cfg.dataset_resampled or resampled:
        cmd += ["--dataset-resampled"]
    if cfg.grad_checkpointing:
        cmd += ["--grad-checkpointing"]
    if cfg.torchcompile:
        cmd += ["--torchcompile"]
    if cfg.local_loss:
        cmd += ["--local-loss", "--gather-with-grad"]
    if unmasked:
        cmd += ["--force-patch-dropout", "0"]
    if resume:
        cmd += ["--resume", resume]
    if stop_after is not None and stop_after < epochs:
        cmd += [STOP_FLAG, str(stop_after)]
    return cmd + list(cfg.extra_args)


def node_launcher(cfg: TrainConfig, rendezvous: Path) -> list[str]:
    """What starts one node process on each of `nodes_per_expert` hosts: `train.node_launcher`
    (`{nodes}` replaced, e.g. `srun --nodes={nodes} --ntasks-per-node=1`), or with none, that many
    on this host; each node process runs `experts.nodes`, which joins the rendezvous."""
    nodes = cfg.nodes_per_expert
    node = [sys.executable, "-m", "experts.nodes"]
    if cfg.node_launcher:
        return [part.replace("{nodes}", str(nodes)) for part in cfg.node_launcher] + node + [str(rendezvous), "--"]
    return node + ["--copies", str(nodes), str(rendezvous), "--"]


# Exec the trainer with PR_SET_PDEATHSIG = SIGKILL (Linux): if moda's process is killed, its
# trainer dies with it instead of writing on into checkpoints that a rerun is resuming.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))\n"
    "except Exception:\n    pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def compile_cache_env(folder: Path) -> dict[str, str]:
    """Environment that keeps torch.compile's caches (inductor's FX graphs, its autograd graphs,
    Triton kernels) in `folder`, the run's own: every launch of a run compiles the same model,
    and without it each one compiled from nothing wherever the node's /tmp was not kept (a SLURM
    or Kubernetes job's). A value the user set is kept."""
    wanted = {"TORCHINDUCTOR_CACHE_DIR": str(folder), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
              "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    return {name: os.environ.get(name, value) for name, value in wanted.items()}


def run_trainer(cmd: list[str], log_file: Path, gpus: list[str] | None = None,
                on_line: Callable[[str], None] | None = None, threads: int | None = None,
                extra_env: dict[str, str] | None = None) -> None:
    """Run the trainer on `gpus` (None: leave the mask alone), streaming its output; raise on failure.

    `threads`: the trainer's CPU threads, set explicitly (a CPU run's numbers depend on its thread
    count, and an inherited OMP_NUM_THREADS must not change them: Dask's local cluster leaves
    OMP_NUM_THREADS=1 in the process that started it). On Linux the trainer is tied to this
    process's life (see _DIE_WITH_PARENT).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if threads:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    env.update(extra_env or {})
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    # line-buffered: each line is in the log as the trainer prints it (the live progress reads it;
    # with a block buffer it arrived 8 KB, about 90 s of training, at a time)
    with open(log_file, "a", encoding="utf-8", buffering=1) as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        launch = [sys.executable, "-c", _DIE_WITH_PARENT] + cmd if sys.platform == "linux" else cmd
        proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
