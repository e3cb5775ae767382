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

from pipelines.manifest import atomic_write_json, file_sha256, require_manifest

ADDED_DIR = "added"
ADDED_REGISTRY = "registry.json"


@dataclass(frozen=True)
class Expert:
    """One expert of the routed ensemble."""

    id: int
    name: str                 # row name in reports, e.g. expert_004
    path: Path                # its local-dir model folder
    fine_clusters: tuple[int, ...]  # S_c: the fine clusters it owns for routing
    added: bool = False


def read_registry(train_dir: Path) -> dict:
    path = Path(train_dir) / "registry.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the experts first (moda run ...)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_added(run_root: Path) -> list[dict]:
    """Every entry of added/registry.json (current or stale), in the order they were added."""
    path = Path(run_root) / ADDED_DIR / ADDED_REGISTRY
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["experts"]


def current_added(run_root: Path) -> tuple[list[dict], list[dict]]:
    """(added entries seeded by the current train stage, stale ones)."""
    train_fp = require_manifest(Path(run_root) / "train", "train")["fingerprint"]
    entries = read_added(run_root)
    return ([e for e in entries if e["train_fingerprint"] == train_fp],
            [e for e in entries if e["train_fingerprint"] != train_fp])


def load_experts(run_root: str | Path) -> list[Expert]:
    """The train stage's experts, then the current added ones, in id order."""
    root = Path(run_root)
    registry = read_registry(root / "train")
    experts = [Expert(e["id"], e["model_dir"], root / "train" / e["model_dir"], tuple(e["fine_clusters"]))
               for e in registry["experts"]]
    added, _ = current_added(root)
    experts += [Expert(e["id"], e["name"], root / e["model_dir"], tuple(e["fine_clusters"]), added=True)
                for e in added]
    return experts


def ownership(experts: list[Expert], num_fine: int) -> np.ndarray:
    """(n, m) boolean matrix: owns[c, s] when expert c routes fine cluster s."""
    owns = np.zeros((len(experts), num_fine), dtype=bool)
    for row, expert in enumerate(experts):
        owns[row, list(expert.fine_clusters)] = True
    return owns


def added_fingerprint(run_root: str | Path) -> str:
    """What downstream stages (evaluate) fingerprint of the added experts: the file's hash."""
    path = Path(run_root) / ADDED_DIR / ADDED_REGISTRY
    return file_sha256(path) if path.is_file() else ""


def register_added(run_root: str | Path, entry: dict) -> None:
    """Append one expert to added/registry.json (atomically; an entry with its id is replaced)."""
    entries = [e for e in read_added(Path(run_root)) if e["id"] != entry["id"]] + [entry]
    atomic_write_json(Path(run_root) / ADDED_DIR / ADDED_REGISTRY,
                      {"experts": sorted(entries, key=lambda e: e["id"])})
