"""What makes a config impossible, checked at load time with the key named.

A typo that silently falls back to a default, or a combination that cannot
run (fewer fine clusters than experts), costs a whole training run if it is
found only when the stage that uses it starts.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config file that cannot describe a valid run."""


ABLATIONS = ("random", "one_step", "experts=<n>", "fine=<m>", "expert_epochs=<e>")


def parse_ablation(variant: str) -> tuple[str, int | None]:
    """("random" | "one_step" | "experts" | "fine" | "expert_epochs", its number). The paper's
    ablations change the cluster stage and their experts continue the run's seed: `random`: Rand-n,
    the same expert sizes dealt at random; `one_step`: clustering straight into the experts (m = n);
    `experts=2`: MoDE-2 (n = 2); `fine=16`: m = 16 fine clusters. `expert_epochs=3` changes the
    expert phase's length within the same total: the experts and a matched baseline continue the
    run's seed from its epoch `seed_epochs + expert_epochs - 3` (the seed shortened, the total kept)."""
    if variant in ("random", "one_step"):
        return variant, None
    kind, _, number = variant.partition("=")
    if kind in ("experts", "fine", "expert_epochs") and number.isdigit() and int(number) > 0:
        return kind, int(number)
    raise ConfigError(f"evaluate.ablations: unknown variant {variant!r}; variants are {list(ABLATIONS)}")


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def validate(cfg: Any) -> None:
    """Raise ConfigError naming the first key whose value cannot run."""
    c = cfg.cluster
    _positive(c.num_experts, "cluster.num_experts")
    _positive(c.num_fine, "cluster.num_fine")
    if c.num_fine < c.num_experts:
        raise ConfigError(
            f"cluster.num_fine ({c.num_fine}) must be >= cluster.num_experts "
            f"({c.num_experts}): every expert owns at least one fine cluster"
        )
    if c.sample_size < 0:
        raise ConfigError("cluster.sample_size must be >= 0 (0 = use all samples)")
    _positive(c.niter, "cluster.niter")
    if c.balance_iters < 0:
        raise ConfigError(f"cluster.balance_iters must be >= 0, got {c.balance_iters}")
    if c.balance_slack < 0:
        raise ConfigError("cluster.balance_slack must be >= 0")
    _positive(c.balance_topk, "cluster.balance_topk")
    if c.max_expert_ratio < 1:
        raise ConfigError("cluster.max_expert_ratio must be >= 1")
    _choice(cfg.data.missing_shards, ("skip", "error"), "data.missing_shards")
    e = cfg.embed
    _choice(e.pooling, ("model", "mean", "cls"), "embed.pooling")
    _positive(e.batch_size, "embed.batch_size")
    _choice(e.precision, ("auto", "fp32", "bf16", "fp16"), "embed.precision")
    _choice(e.storage, ("float32", "float16"), "embed.storage")
    if e.processes < 0 or e.simcse_steps < 0:
        raise ConfigError("embed.processes and embed.simcse_steps must be >= 0")
    _positive(e.simcse_batch_size, "embed.simcse_batch_size")
    _positive(e.simcse_lr, "embed.simcse_lr")
    _positive(e.simcse_temperature, "embed.simcse_temperature")
    _positive(cfg.split.shard_size, "split.shard_size")
    _positive(cfg.split.min_shards, "split.min_shards")
    if not 0 <= cfg.split.ooc_ratio < 1:
        raise ConfigError("split.ooc_ratio must be in [0, 1)")
    _choice(cfg.split.validate, ("header", "decode"), "split.validate")
    if cfg.split.processes < 0:
        raise ConfigError("split.processes must be >= 0 (0 = one per two CPU cores)")
    t = cfg.train
    _positive(t.seed_epochs, "train.seed_epochs")
    _positive(t.expert_epochs, "train.expert_epochs")
    _positive(t.batch_size, "train.batch_size")
    _positive(t.lr, "train.lr")
    _choice(t.precision, ("auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16"),
            "train.precision")
    _choice(t.optimizer, ("adamw", "lamb"), "train.optimizer")
    _choice(t.expert_init, ("resume", "weights"), "train.expert_init")
    _choice(t.expert_epoch, ("cluster", "dataset"), "train.expert_epoch")
    _choice(t.seed_schedule, ("continued", "annealed"), "train.seed_schedule")
    if not 0 <= t.patch_dropout < 1:
        raise ConfigError("train.patch_dropout must be in [0, 1)")
    if not 0 <= t.unmasked_tune_share <= 1:
        raise ConfigError("train.unmasked_tune_share must be in [0, 1]")
    _positive(t.gpus_per_expert, "train.gpus_per_expert")
    _positive(t.nodes_per_expert, "train.nodes_per_expert")
    _positive(t.workers, "train.workers")
    _positive(t.models_per_gpu, "train.models_per_gpu")
    _choice(t.keep_checkpoints, ("needed", "all"), "train.keep_checkpoints")
    if not all(isinstance(k, int) and 1 <= k < t.seed_epochs for k in t.keep_seed_epochs):
        raise ConfigError(f"train.keep_seed_epochs must list epochs of the seed before its last (1 to "
                          f"{t.seed_epochs - 1}), got {list(t.keep_seed_epochs)}")
    if t.models_per_gpu > 1 and t.gpus_per_expert > 1:
        raise ConfigError("train.models_per_gpu packs one-GPU models: set it to 1 with train.gpus_per_expert > 1")
    _choice(cfg.executor, ("local", "dask"), "executor")
    d = cfg.dask
    if d.address and d.cluster:
        raise ConfigError("dask.address and dask.cluster name two clusters: keep one (an address joins a running "
                          "cluster, a class starts one for the run)")
    if d.cluster and "." not in d.cluster:
        raise ConfigError(f"dask.cluster must be an import path such as dask_jobqueue.SLURMCluster, got {d.cluster!r}")
    _positive(d.local_workers, "dask.local_workers")
    _positive(d.workers_timeout_s, "dask.workers_timeout_s")
    _choice(cfg.evaluate.routing, ("paper", "released"), "evaluate.routing")
    _choice(cfg.evaluate.unreadable_images, ("skip", "error"), "evaluate.unreadable_images")
    if not all(isinstance(k, int) and k >= 1 for k in cfg.evaluate.probe_shots):
        raise ConfigError("evaluate.probe_shots must be whole numbers of images per class, each >= 1")
    _positive(cfg.evaluate.lam, "evaluate.lam")
    if cfg.evaluate.workers < -1:
        raise ConfigError("evaluate.workers must be -1 (auto), 0 (decode in the stage's thread) or a thread count")
    for ablation in cfg.evaluate.ablations:
        kind, value = parse_ablation(ablation)
        if kind == "experts" and not 2 <= value <= cfg.cluster.num_fine:
            raise ConfigError(f"evaluate.ablations: {ablation!r} needs 2 <= experts <= cluster.num_fine")
        if kind == "fine" and value < cfg.cluster.num_experts:
            raise ConfigError(f"evaluate.ablations: {ablation!r} needs fine >= cluster.num_experts")
        if kind == "expert_epochs":
            _phase_rule(cfg, ablation, value)
    if len(set(cfg.evaluate.ablations)) != len(cfg.evaluate.ablations):
        raise ConfigError("evaluate.ablations lists a variant twice")
    _positive(cfg.report.seeds, "report.seeds")
    if cfg.report.resamples < 100:
        raise ConfigError("report.resamples must be >= 100")
    if not 0.5 < cfg.report.confidence < 1:
        raise ConfigError("report.confidence must be in (0.5, 1)")
    _positive(cfg.add_expert.fine_per_class, "add_expert.fine_per_class")
    if not 0 < cfg.add_expert.coverage <= 1:
        raise ConfigError("add_expert.coverage must be in (0, 1]")
    _validate_sweep(cfg)
    s = cfg.synth
    _positive(s.num_train, "synth.num_train")
    _positive(s.shard_size, "synth.shard_size")
    if not 0 <= s.wrong_caption_rate < 1:
        raise ConfigError("synth.wrong_caption_rate must be in [0, 1)")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name must be a non-empty folder name, got {cfg.name!r}")


def _phase_rule(cfg: Any, ablation: str, expert_epochs: int) -> None:
    """An expert phase of another length continues the run's own seed at an epoch of its one
    schedule, so the seed must be trained here, in the continued schedule, and that epoch kept."""
    t = cfg.train
    total = t.seed_epochs + t.expert_epochs
    if t.seed_checkpoint or t.seed_schedule != "continued" or t.expert_init != "resume":
        raise ConfigError(f"evaluate.ablations: {ablation!r} continues the run's own seed at an earlier epoch of "
                          "its schedule: it needs train.seed_checkpoint empty, train.seed_schedule continued and "
                          "train.expert_init resume")
    if not 1 <= expert_epochs < total or expert_epochs == t.expert_epochs:
        raise ConfigError(f"evaluate.ablations: {ablation!r} needs 1 <= expert_epochs < {total} (seed_epochs + "
                          f"expert_epochs) and another length than the run's own ({t.expert_epochs})")
    start = total - expert_epochs
    if start < t.seed_epochs and start not in t.keep_seed_epochs:
        raise ConfigError(f"evaluate.ablations: {ablation!r} continues the seed from its epoch {start}: add {start} "
                          f"to train.keep_seed_epochs (now {list(t.keep_seed_epochs)}) so that checkpoint is kept")
    if start > t.seed_epochs:
        raise ConfigError(f"evaluate.ablations: {ablation!r} would start after the seed's last epoch "
                          f"({t.seed_epochs}): a shorter expert phase needs a longer seed")


def _validate_sweep(cfg: Any) -> None:
    w = cfg.sweep
    if not w.epochs or any(e < 2 for e in w.epochs) or len(set(w.epochs)) != len(w.epochs):
        raise ConfigError(f"sweep.epochs must list distinct budgets of at least 2 epochs, got {w.epochs}")
    if not 0 < w.seed_share < 1:
        raise ConfigError(f"sweep.seed_share must be in (0, 1), got {w.seed_share}")
    for epochs in w.epochs:
        seed = epochs * w.seed_share
        if abs(seed - round(seed)) > 1e-9 or not 1 <= round(seed) < epochs:
            raise ConfigError(f"sweep.seed_share {w.seed_share} of sweep.epochs {epochs} is {seed:g} seed epochs: "
                              "choose budgets and a share that give a whole number, at least 1 and below the "
                              "budget (e.g. seed_share 0.5 with even budgets)")
    if w.experts and cfg.cluster.num_experts not in w.experts:
        raise ConfigError(f"sweep.experts {w.experts} must include cluster.num_experts ({cfg.cluster.num_experts}): "
                          "the points' own experts are one of the systems the sweep compares")
    if len(set(w.experts)) != len(w.experts) or not all(2 <= n <= cfg.cluster.num_fine for n in w.experts):
        raise ConfigError(f"sweep.experts must list distinct n with 2 <= n <= cluster.num_fine, got {w.experts}")
    if len(set(w.models)) != len(w.models):
        raise ConfigError("sweep.models lists a model twice")
    if w.resamples < 50:
        raise ConfigError("sweep.resamples must be >= 50")
    if not 0.5 < w.confidence < 1:
        raise ConfigError("sweep.confidence must be in (0.5, 1)")
    _positive(w.parallel_points, "sweep.parallel_points")
