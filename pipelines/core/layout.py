"""Every path under a run folder, in one place: `RunLayout`.

A run folder (`runs/<name>/` unless `--run-dir` says otherwise) holds one
folder per stage, each ending with its manifest, plus `added/` (experts added
later), `ablations/<variant>/`, `seeds/replicate_<k>/` and `sweep/<point>/`
(each a run folder of its own) and `cache/`. Only this module spells the names
of the files in it, so a reader finds the whole layout here and a rename is one
edit. `python -m pipelines.core.layout` prints every path it knows (`tree()`):
docs/run-folder.md holds that listing, and tests/test_docs.py fails when they
differ, so the documented layout cannot drift from the code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
SIZES = "sizes.json"  # shard name -> samples, beside a shard set (what open_clip_train reads)
REGISTRY = "registry.json"
TASK_FILE = "task.json"  # an evaluation task folder's description (moda's format; not in a run folder)


def expert_name(expert: int) -> str:
    """`expert_007`: an expert's folder and row name everywhere (split, train, reports)."""
    return f"expert_{expert:03d}"


def expert_id(name: str) -> int:
    """The number in an expert's name (`expert_007` -> 7)."""
    return int(name.split("_")[1])


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
"""What an input shard's file name may end with (the compressed ones are decompressed to read)."""


def shard_id(path: str | Path) -> str:
    """An input shard's name without its tar suffix (`00007.tar.gz` -> `00007`): what its outputs
    and manifest entries are named by."""
    name = getattr(path, "name", None) or Path(path).name  # a ShardURL knows a pipe: command's file
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return Path(name).stem


def shard_name(index: int) -> str:
    """The file name of output shard `index` of a shard set (`00007.tar`)."""
    return f"{index:05d}.tar"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. Pure path arithmetic: nothing is created or read."""

    root: Path

    @classmethod
    def of(cls, name: str, run_dir: str | Path | None = None) -> RunLayout:
        """runs/<name>/, or `run_dir` when given."""
        return cls(Path(run_dir) if run_dir else Path("runs") / name)

    def stage(self, name: str) -> Path:
        return self.root / name

    def manifest(self, stage: str) -> Path:
        return self.stage(stage) / MANIFEST

    # ------------------------------------------------------------ embed
    @property
    def embed(self) -> Path:
        return self.stage("embed")

    def embeddings(self, shard: str) -> Path:
        return self.embed / f"{shard}.parquet"

    def embed_marker(self, shard: str) -> Path:
        return self.embed / f"{shard}.done.json"

    @property
    def embed_rejects(self) -> Path:
        return self.embed / "rejects.parquet"

    @property
    def encoder(self) -> Path:
        return self.embed / "encoder"

    @property
    def encoder_marker(self) -> Path:
        return self.embed / "encoder.done.json"

    # ------------------------------------------------------------ cluster
    @property
    def cluster(self) -> Path:
        return self.stage("cluster")

    @property
    def fine_centroids(self) -> Path:
        return self.cluster / "fine_centroids.npy"

    @property
    def expert_of_fine(self) -> Path:
        return self.cluster / "expert_of_fine.npy"

    @property
    def expert_centroids(self) -> Path:
        return self.cluster / "expert_centroids.npy"

    @property
    def assignments(self) -> Path:
        return self.cluster / "assignments.parquet"

    @property
    def cluster_report(self) -> Path:
        return self.cluster / "report.json"

    @property
    def cluster_plot(self) -> Path:
        return self.cluster / "cluster_sizes.png"

    def contact_sheet(self, expert: int) -> Path:
        """An expert's contact sheet: example images nearest its fine centres, with their captions."""
        return self.cluster / "contact" / f"{expert_name(expert)}.png"

    @property
    def cluster_examples(self) -> Path:
        """Example captions of every fine cluster, grouped by expert, beside the contact sheets."""
        return self.cluster / "examples.md"

    @property
    def fine_counts(self) -> Path:
        """Samples per fine cluster of new data assigned to a run's centres (an added expert's)."""
        return self.cluster / "fine_counts.json"

    # ------------------------------------------------------------ split
    @property
    def split(self) -> Path:
        return self.stage("split")

    @property
    def split_plan(self) -> Path:
        return self.split / "plan.json"

    @property
    def split_rejects(self) -> Path:
        return self.split / "rejects.parquet"

    def expert_shards(self, expert: int) -> Path:
        """An expert's shard set: {00000..}.tar, sizes.json and its manifest."""
        return self.split / expert_name(expert)

    def output_shard(self, expert: int, index: int) -> Path:
        return self.expert_shards(expert) / shard_name(index)

    @property
    def input_records(self) -> Path:
        return self.split / "progress" / "inputs"

    def input_record(self, shard: str) -> Path:
        return self.input_records / f"{shard}.json"

    @property
    def output_records(self) -> Path:
        return self.split / "progress" / "outputs"

    def output_record(self, expert: int, index: int) -> Path:
        return self.output_records / f"{expert:03d}_{index:05d}.json"

    # ------------------------------------------------------------ train
    @property
    def train(self) -> Path:
        return self.stage("train")

    @property
    def model_config(self) -> Path:
        """The architecture as a local-dir folder without weights (`--model local-dir:...`)."""
        return self.train / "model_config"

    @property
    def train_logs(self) -> Path:
        return self.train / "logs"

    def run_logs(self, model: str) -> Path:
        """open_clip_train's `--logs/--name` folder of one model: checkpoints, tensorboard, out.log."""
        return self.train_logs / model

    def checkpoints(self, model: str) -> Path:
        return self.run_logs(model) / "checkpoints"

    def checkpoint(self, model: str, epoch: int | str) -> Path:
        """open_clip_train's checkpoint after `epoch` (or "latest")."""
        return self.checkpoints(model) / f"epoch_{epoch}.pt"

    def job_marker(self, model: str) -> Path:
        """The fingerprint a model's checkpoints were trained under (others are discarded)."""
        return self.run_logs(model) / "moda_fingerprint.txt"

    def trainer_log(self, model: str) -> Path:
        return self.train / f"{model}.log"

    def model(self, name: str) -> Path:
        """A trained model's local-dir folder (seed, baseline, expert_000, ...)."""
        return self.train / name

    @property
    def registry(self) -> Path:
        return self.train / REGISTRY

    @property
    def seed_init(self) -> Path:
        """A given seed's weights as a bare state_dict (train.seed_checkpoint a local-dir folder)."""
        return self.train / "seed_init.pt"

    @property
    def seed_weights(self) -> Path:
        """The seed's weights without optimizer state (train.expert_init: weights)."""
        return self.train / "seed_weights.pt"

    # ------------------------------------------------------------ evaluate
    @property
    def evaluate(self) -> Path:
        return self.stage("evaluate")

    @property
    def results(self) -> Path:
        return self.evaluate / "results.json"

    @property
    def results_markdown(self) -> Path:
        return self.evaluate / "results.md"

    @property
    def feature_cache(self) -> Path:
        """Image features per (model, task) content fingerprint: outside evaluate/, which a rerun
        clears, so rerunning evaluate or adding an expert encodes only the pairs not seen."""
        return self.root / "cache" / "image_features"

    @property
    def remote_cache(self) -> Path:
        """Local copies of evaluation folders named by URL (s3://, https://, ...)."""
        return self.root / "cache" / "remote"

    @property
    def results_jsonl(self) -> Path:
        """One line per (model, task), DataComp-style (key, dataset, model, metrics with main_metric)."""
        return self.evaluate / "results.jsonl"

    def clip_benchmark_result(self, task: str, row: str) -> Path:
        """A (model, task) result in clip_benchmark's JSON format."""
        slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{task}__{row}")
        return self.evaluate / "clip_benchmark" / f"{slug}.json"

    @property
    def routing_log(self) -> Path:
        return self.evaluate / "routing.json"

    @property
    def per_sample(self) -> Path:
        """Every row's hit or miss on every test sample (what the report's intervals resample)."""
        return self.evaluate / "per_sample.parquet"

    @property
    def routing_plot(self) -> Path:
        return self.evaluate / "routing_weights.png"

    @property
    def accuracy_plot(self) -> Path:
        return self.evaluate / "accuracy.png"

    # ------------------------------------------------------------ added experts, ablations
    @property
    def added(self) -> Path:
        return self.root / "added"

    @property
    def added_registry(self) -> Path:
        return self.added / REGISTRY

    def added_expert(self, name: str) -> RunLayout:
        """An added expert's folder: request.json, and embed/cluster/split/train of its own."""
        return RunLayout(self.added / name)

    @property
    def request(self) -> Path:
        """An added expert's request (in its own layout)."""
        return self.root / "request.json"

    def ablation(self, variant: str) -> RunLayout:
        """An ablation's run folder (`experts=2` lives in ablations/experts-2)."""
        return RunLayout(self.root / "ablations" / variant.replace("=", "-"))

    def replicate(self, seed: int) -> RunLayout:
        """The run folder of trainer-seed replicate `seed` (k >= 1; train.seed + k): its own train,
        ablations' train and evaluate; embed, cluster and split linked to this run's."""
        return RunLayout(self.root / "seeds" / f"replicate_{seed}")

    # ------------------------------------------------------------ report
    @property
    def report(self) -> Path:
        return self.stage("report")

    @property
    def report_json(self) -> Path:
        return self.report / "report.json"

    @property
    def report_markdown(self) -> Path:
        return self.report / "report.md"

    @property
    def report_plot(self) -> Path:
        return self.report / "differences.png"

    # ------------------------------------------------------------ sweep (moda sweep)
    def sweep_point(self, name: str) -> RunLayout:
        """A scaling sweep's point (one model at one budget): a run folder of its own, its embed,
        cluster and split (and its ablations' cluster and split) linked to this run's."""
        return RunLayout(self.root / "sweep" / name)

    @property
    def scaling(self) -> Path:
        return self.stage("scaling")

    @property
    def scaling_json(self) -> Path:
        return self.scaling / "scaling.json"

    @property
    def scaling_markdown(self) -> Path:
        return self.scaling / "scaling.md"

    def scaling_plot(self, task: str) -> Path:
        """The log-log plot of every system's points and fitted law on one task."""
        return self.scaling / f"{task}.png"


def tree() -> str:
    """Every path RunLayout names, relative to the run folder, with the attribute that names it and
    its docstring's first sentence: the run-folder listing of docs/run-folder.md. Arguments are shown
    as placeholders (`SHARD`, `MODEL`); numbers as 0 (`expert_000`, `00000.tar`). A method that
    returns a RunLayout (an ablation, a replicate, a sweep point, an added expert) is a run folder
    of its own and is listed as such."""
    layout, rows = RunLayout(Path("/RUN")), []
    for name, member in inspect.getmembers(RunLayout):
        if name.startswith("_") or name in ("of", "root", "stage", "manifest"):
            continue
        if isinstance(member, property):
            value, doc = getattr(layout, name), member.__doc__
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters.values())[1:]
            args = [(1 if p.name == "seed" else 0) if p.annotation in (int, "int", "int | str") else p.name.upper()
                    for p in params]
            value, doc = member(layout, *args), member.__doc__
        else:
            continue
        path = (value.root if isinstance(value, RunLayout) else value).relative_to("/RUN").as_posix()
        if isinstance(value, RunLayout):
            path += "/ (a run folder of its own)"
        rows.append((path, name, " ".join((doc or "").split()).split(". ")[0].rstrip(".")))
    rows.append(("STAGE/manifest.json", "manifest", "every stage folder's manifest, written last"))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["runs/<name>/"]
    for path, name, doc in sorted(rows):
        lines.append(f"  {path.ljust(width)}{name}" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(tree())
