"""The one stage type, and the one wrapper that runs any stage: skip, clean, work, manifest.

A stage is a name, the stages it reads, its fingerprint and its work.
`run_stage` does what every stage needs around its work, so no stage
repeats it:

1. read the manifests of the stages it reads (a clear error says which to run
   first when one is missing) and check that their outputs are still the ones
   they recorded (an expert shard edited or deleted after the split is refused
   by name, not trained on);
2. work out the fingerprint: a hash of what the stage's outputs depend on
   (its config section's result-changing fields, upstream fingerprints, input
   file hashes); never of how the stage runs (processes, devices, executor);
3. skip when the stage folder's manifest has that fingerprint and every
   output it lists still has its recorded hash;
4. otherwise remove the temporary files a killed run left, do the work, and
   write `manifest.json` last: its presence marks the stage complete.

The work may resume inside itself (embed per shard group, split per shard,
train per checkpoint): a stage that was killed skips what it had finished
by its own markers, which the fingerprint also keys.

Stages receive a `StageContext`: their own config section, the data section
(where the inputs are), the run layout, the upstream manifests, and hooks for
how independent jobs run and where their log lines go (set by the Prefect
layer; a stage never imports Prefect).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.devices import pin_cpu_threads
from pipelines.core.jobs import Pool
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import (
    first_changed_output,
    is_done,
    read_manifest,
    remove_stale_temps,
    require_manifest,
    write_manifest,
)


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's outputs depend on: `value` keys the skip; `config_hash` and `inputs` go
    into the manifest; `details` holds what was worked out on the way and the work reuses
    (input file hashes, the model config), so nothing is computed twice."""

    value: str
    config_hash: str
    inputs: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What the work produced: output files (path relative to the stage folder -> sha256),
    counts for the manifest, and any further manifest fields."""

    outputs: dict[str, str]
    counts: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hooks:
    """How a stage's independent jobs run, set by the caller; none of it changes a result.

    `runner(jobs, concurrency)` runs callables and returns their results in
    order (default: threads, the work itself happens in subprocesses);
    `distributed` says the runner places jobs on other hosts (no local GPU
    slot is held for them, their lines stay in their log files); `on_line(job,
    line)` receives a job's log lines; `on_progress(job, share)` its share done;
    `pool` (pipelines/core/jobs.py) runs the stage's process jobs elsewhere
    (the run's `executor: dask`), None on this host.
    """

    runner: Callable[[list[Callable[[], Any]], int], list[Any]] | None = None
    distributed: bool = False
    on_line: Callable[[str, str], None] | None = None
    on_progress: Callable[[str, float], None] | None = None
    pool: Pool | None = None


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: its own config section, the data section, the run layout, the
    manifests of the stages it reads, and the hooks."""

    section: Any
    data: Any
    layout: RunLayout
    upstream: dict[str, dict]
    hooks: Hooks = Hooks()


@dataclass(frozen=True)
class Report:
    """Something a person would rather look at than read, published by the run layer (a Prefect
    artifact): a markdown text or a table (list of rows)."""

    key: str
    description: str
    markdown: str | None = None
    table: list[dict] | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    `section`: the config section it receives; `reads`: the stages whose
    manifests it needs; `fingerprint(ctx)`; `work(ctx, fingerprint)`;
    `reports(ctx, manifest)`: what to publish after a run that did work;
    `clean(stage_dir)`: removes what a killed run left before work starts.

    What it needs from the run layer, so the flow iterates the stage list and names no stage:
    `on_cluster`: its jobs go to the run's Dask cluster with `executor: dask`; `places_runs`: its
    jobs are whole runs that the hooks' runner places (a trainer each), not process jobs for the
    pool; `role`: TRAINS (derived runs train in its slot: ablations, trainer-seed replicates, an
    added expert) or SCORES (replicates are evaluated in its slot); `summary(layout)`: the markdown
    a run that ends with it returns.
    """

    name: str
    section: str
    reads: tuple[str, ...]
    fingerprint: Callable[[StageContext], Fingerprint]
    work: Callable[[StageContext, Fingerprint], StageResult]
    reports: Callable[[StageContext, dict], list[Report]] = lambda ctx, manifest: []
    clean: Callable[[Any], int] = remove_stale_temps
    on_cluster: bool = False
    places_runs: bool = False
    role: str = ""
    summary: Callable[[RunLayout], Any] | None = None
    writes: str = ""

    @property
    def folder(self) -> str:
        """The run-folder stage it writes: its own name, or `writes` for a step that stands in for a
        pipeline stage's outputs (an added expert's assignment to the run's centres writes the
        `cluster/` its split reads) under a name of its own."""
        return self.writes or self.name


TRAINS = "trains"
SCORES = "scores"


def upstream_manifests(stage: Stage, layout: RunLayout) -> dict[str, dict]:
    """The manifests of the stages `stage` reads; FileNotFoundError names the one to run first."""
    return {name: require_manifest(layout.stage(name), name) for name in stage.reads}


class UpstreamChanged(ValueError):
    """An upstream stage's output is missing or differs from what its manifest recorded."""


def check_upstream_intact(stage: Stage, ctx: StageContext) -> None:
    """Refuse to build on an upstream output that changed after its stage wrote it: the upstream
    manifest (and every fingerprint keyed on it) would describe files that are no longer there."""
    for name, manifest in ctx.upstream.items():
        rel = first_changed_output(ctx.layout.stage(name), manifest)
        if rel is not None:
            path = ctx.layout.stage(name) / rel
            what = "is missing" if not path.is_file() else "differs from the sha256 its manifest recorded"
            raise UpstreamChanged(
                f"{path} {what}: it changed after the {name} stage wrote it, so the {stage.name} stage "
                f"will not use it. Rerun the {name} stage (`moda run <config>` reruns it and what "
                f"depends on it; or `moda stage {name} <config>`), or restore the file.")


def is_stage_done(stage: Stage, ctx: StageContext) -> bool:
    """Whether `run_stage` would skip it: its outputs match its fingerprint."""
    return is_done(ctx.layout.stage(stage.folder), stage.fingerprint(ctx).value)


def run_stage(stage: Stage, ctx: StageContext) -> dict:
    """Run `stage` unless its outputs match its fingerprint; return its manifest ("skipped" when
    it did nothing)."""
    started = time.time()
    check_upstream_intact(stage, ctx)
    stage_dir = ctx.layout.stage(stage.folder)
    fingerprint = stage.fingerprint(ctx)
    if is_done(stage_dir, fingerprint.value):
        return {**read_manifest(stage_dir), "skipped": True}
    stage.clean(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    pin_cpu_threads()
    result = stage.work(ctx, fingerprint)
    return write_manifest(stage_dir, stage=stage.folder, fingerprint=fingerprint.value,
                          config_hash=fingerprint.config_hash, inputs=fingerprint.inputs,
                          outputs=result.outputs, counts=result.counts, started=started, extra=result.extra)
