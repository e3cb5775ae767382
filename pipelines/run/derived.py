"""Derived runs: a run folder that links some of a parent run's stage folders and runs the rest
with a config patch.

A trainer-seed replicate (another `train.seed`: links embed, cluster and split, trains and
evaluates its own), an ablation variant (another cluster section: links embed, runs cluster,
split and the experts from the parent's seed), a scaling sweep's point (another model or budget:
links what every point shares) are each a `DerivedRun`. One type makes the folder and its links
(relative symlinks, so a run folder stays movable), runs its stages in order through the same
`run_stage` as every run, and says when it is done: when every stage it runs matches its
fingerprint, the one completion rule of every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.config import Config
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks
from pipelines.run.stages import run_stage, stage_done


def link(target: Path, link_path: Path) -> None:
    """A relative symlink `link_path` -> `target` (a run folder stays movable)."""
    if not link_path.exists() and not link_path.is_symlink():
        link_path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, link_path.parent), link_path)


@dataclass(frozen=True)
class DerivedRun:
    """`layout`'s folder with `links` ((link path, target) pairs) made, running `stages` under `cfg`."""

    layout: RunLayout
    cfg: Config | None  # None: a folder only prepared (its stages run elsewhere)
    stages: tuple[str, ...]
    links: tuple[tuple[Path, Path], ...] = ()

    @classmethod
    def of(cls, parent: RunLayout, folder: RunLayout, cfg: Config | None, linked: tuple[str, ...],
           stages: tuple[str, ...]) -> DerivedRun:
        """`folder` linking the `linked` stages of `parent` and running `stages`."""
        return cls(folder, cfg, stages, tuple((folder.stage(s), parent.stage(s)) for s in linked))

    def prepare(self) -> RunLayout:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        for link_path, target in self.links:
            link(target, link_path)
        return self.layout

    def done(self) -> bool:
        return all(stage_done(stage, self.cfg, self.layout) for stage in self.stages)

    def run(self, hooks: Hooks = Hooks()) -> dict[str, dict]:
        """Every stage's manifest, in order (a finished stage is skipped by run_stage)."""
        self.prepare()
        return {stage: run_stage(stage, self.cfg, self.layout, hooks) for stage in self.stages}
