"""The experts a run serves: the train stage's registry plus experts added later.

The train stage writes `train/registry.json` (seed, experts, baseline).
`moda add-expert` never rewrites it (that would touch the train stage's
outputs and make the next `moda/full` retrain); it registers each new expert
in `added/registry.json` instead. Routing, evaluation and `moda predict` read
both through `load_experts`, so a new expert is picked up on the next load.

An added expert was seeded from one particular seed checkpoint; if the train
stage has since been rerun (another config, other data), that expert belongs
to an older system and is left out (reported as stale) until it is added again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json, file_sha256, require_manifest


@dataclass(frozen=True)
class Expert:
    """One expert of the routed ensemble."""

    id: int
    name: str                 # row name in reports, e.g. expert_004
    path: Path                # its local-dir model folder
    fine_clusters: tuple[int, ...]  # S_c: the fine clusters it owns for routing
    added: bool = False


def read_registry(layout: RunLayout) -> dict:
    """The train stage's registry: seed, experts, baseline."""
    path = layout.registry
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the experts first (moda run ...)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_added(layout: RunLayout) -> list[dict]:
    """Every entry of added/registry.json (current or stale), in the order they were added."""
    path = layout.added_registry
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["experts"]


def current_added(layout: RunLayout) -> tuple[list[dict], list[dict]]:
    """(added entries seeded by the current train stage, stale ones)."""
    train_fp = require_manifest(layout.train, "train")["fingerprint"]
    entries = read_added(layout)
    return ([e for e in entries if e["train_fingerprint"] == train_fp],
            [e for e in entries if e["train_fingerprint"] != train_fp])


def load_experts(layout: RunLayout) -> list[Expert]:
    """The train stage's experts, then the current added ones, in id order."""
    registry = read_registry(layout)
    experts = [Expert(e["id"], e["model_dir"], layout.model(e["model_dir"]), tuple(e["fine_clusters"]))
               for e in registry["experts"]]
    added, _ = current_added(layout)
    experts += [Expert(e["id"], e["name"], layout.root / e["model_dir"], tuple(e["fine_clusters"]), added=True)
                for e in added]
    return experts


def ownership(experts: list[Expert], num_fine: int) -> np.ndarray:
    """(n, m) boolean matrix: owns[c, s] when expert c routes fine cluster s."""
    owns = np.zeros((len(experts), num_fine), dtype=bool)
    for row, expert in enumerate(experts):
        owns[row, list(expert.fine_clusters)] = True
    return owns


def added_fingerprint(layout: RunLayout) -> str:
    """What downstream stages (evaluate) fingerprint of the added experts: the file's hash."""
    return file_sha256(layout.added_registry) if layout.added_registry.is_file() else ""


def register_added(layout: RunLayout, entry: dict) -> None:
    """Append one expert to added/registry.json (atomically; an entry with its id is replaced)."""
    entries = [e for e in read_added(layout) if e["id"] != entry["id"]] + [entry]
    atomic_write_json(layout.added_registry, {"experts": sorted(entries, key=lambda e: e["id"])})
