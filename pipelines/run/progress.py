"""What a run is doing, read from its run folder: which stage runs, how far it is, and for how long.

Why files: under `make demo` the stages run in a Prefect worker's subprocess (on Dask workers
with `executor: dask`), so their progress bars land in a log nobody watches and the terminal shows
only Prefect's event stream. Every stage already writes its progress into the run folder as it
goes (embed's done markers, the split's progress records, the trainer's logs, evaluate's feature
cache, each stage's manifest last), so a watcher that reads the folder shows progress wherever the
work runs, with no channel between processes. `snapshot` is a pure read; `Watcher` prints a line
when it changes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experts.models import WEIGHTS_FILE
from experts.train import PROGRESS as TRAIN_PROGRESS
from pipelines.core.layout import RunLayout
from pipelines.run.stages import NAMES as STAGE_NAMES


@dataclass(frozen=True)
class StageState:
    name: str
    state: str  # "waiting", "running", "done"
    detail: str = ""
    seconds: float | None = None  # a finished stage's, from its manifest
    finished_at: float | None = None  # its manifest's mtime


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _train_detail(layout: RunLayout) -> str:
    """Models exported so far, and the newest trainer log's last epoch line."""
    exported = [p.parent.name for p in layout.train.glob(f"*/{WEIGHTS_FILE}")]
    logs = sorted(layout.train.glob("*.log"), key=lambda p: p.stat().st_mtime)
    parts = [f"{len(exported)} model(s) trained"]
    if logs:
        tail = logs[-1].read_bytes()[-4096:].decode("utf-8", "replace")
        found = TRAIN_PROGRESS.findall(tail)
        if found:
            epoch, done, total = found[-1]
            parts.append(f"{logs[-1].stem} epoch {epoch}, {done}/{total} samples")
        else:
            parts.append(f"{logs[-1].stem} starting")
    return "; ".join(parts)


def _detail(layout: RunLayout, stage: str) -> str:
    if stage == "embed":
        return f"{_count(layout.embed, '*.done.json')} input shard(s) embedded"
    if stage == "cluster":
        return "fitting the centres, then assigning every sample"
    if stage == "split":
        return (f"{_count(layout.input_records, '*.json')} input shard(s) read, "
                f"{_count(layout.output_records, '*.json')} expert shard(s) written")
    if stage == "train":
        return _train_detail(layout)
    if stage == "evaluate":
        return f"{_count(layout.feature_cache, '*')} model x task feature set(s) cached"
    return ""


def snapshot(layout: RunLayout, stages: tuple[str, ...] = STAGE_NAMES) -> list[StageState]:
    """Every stage's state as its run folder shows it now (no writes)."""
    out = []
    for stage in stages:
        manifest = layout.manifest(stage)
        if manifest.is_file():
            try:
                seconds = float(json.loads(manifest.read_text()).get("seconds", 0.0))
            except (OSError, ValueError):
                seconds = None
            out.append(StageState(stage, "done", "", seconds, manifest.stat().st_mtime))
        elif layout.stage(stage).is_dir():
            out.append(StageState(stage, "running", _detail(layout, stage)))
        else:
            out.append(StageState(stage, "waiting"))
    return out


def describe(states: list[StageState], since: float, running_since: dict[str, float], now: float) -> str:
    """One line: each finished stage with its time (`earlier` when done before `since`), the running
    one with its progress and time so far, the count of stages still waiting."""
    parts, waiting = [], 0
    for s in states:
        if s.state == "done":
            earlier = s.finished_at is not None and s.finished_at < since
            parts.append(f"{s.name} done" + (" earlier" if earlier else
                                              f" in {s.seconds:.0f} s" if s.seconds is not None else ""))
        elif s.state == "running":
            took = now - running_since.get(s.name, now)
            parts.append(f"{s.name} running {took:.0f} s: {s.detail}" if s.detail else f"{s.name} running {took:.0f} s")
        else:
            waiting += 1
    return " | ".join(parts + ([f"{waiting} stage(s) waiting"] if waiting else []))


class Watcher(threading.Thread):
    """Prints `describe(snapshot(...))` every `interval` seconds when what it says changed (the
    seconds counters aside), and once more when stopped."""

    def __init__(self, layout: RunLayout, interval: float = 5.0, emit: Callable[[str], None] | None = None,
                 prefix: str = "[progress] ") -> None:
        super().__init__(daemon=True)
        self.layout, self.interval, self.prefix = layout, interval, prefix
        self.emit = emit or (lambda line: print(line, flush=True))
        self.since = time.time()
        self.running_since: dict[str, float] = {}
        self.last = ""
        self._stop_event = threading.Event()

    def poll(self) -> None:
        now = time.time()
        states = snapshot(self.layout)
        for s in states:
            if s.state == "running":
                self.running_since.setdefault(s.name, now)
        key = " ".join(f"{s.name}:{s.state}:{s.detail}" for s in states)
        if key != self.last:
            self.last = key
            self.emit(self.prefix + describe(states, self.since, self.running_since, now))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.poll()
            except OSError:  # a file renamed or removed between listing and reading: next time
                continue

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 1)
        try:
            self.poll()
        except OSError:
            pass
