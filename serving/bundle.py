"""Where a trained MoDE system is read from: a run folder or an exported bundle, as one `SystemSpec`.

A routed system is its experts (open_clip local-dir folders), the fine centres, which of them each
expert owns, the routing rule with the lambda chosen on validation tasks, and the caption encoder
the centres were made with. A run folder holds these across its stages (train and added
registries, `cluster/fine_centroids.npy`, the embed manifest, evaluate's results.json); a bundle
(`moda export`, serving/export.py) holds them in one folder another machine can load:

    moda_bundle.json              format, experts, routing, encoder, versions, source fingerprints
    README.md                     the model card (the report's table, intervals and cost)
    routing/fine_centroids.npy    (m, d) float32
    routing/owns.npy              (n, m) bool: the fine clusters each expert owns
    experts/expert_000/           open_clip local-dir: open_clip_config.json (every preprocessing
                                  key explicit) and open_clip_model.safetensors
    encoder/                      the caption encoder's folder, when it is not a hub or PyPI name

Every consumer (MoDESystem, `moda infer`, `moda serve`) reads `read_system`, so a bundle and its
run give the same predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clustering.encoder import run_encoder_spec
from experts.registry import added_fingerprint, load_experts, ownership
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import combine, require_manifest

BUNDLE_FILE = "moda_bundle.json"
FORMAT = "moda-bundle/1"
CENTROIDS = "routing/fine_centroids.npy"
OWNS = "routing/owns.npy"


@dataclass(frozen=True)
class EncoderSpec:
    """What loads the caption encoder (clustering/encoder.py `load_encoder`): a folder, a packaged
    alias or a hub id, its pooling and its precision."""

    model: str
    pooling: str = "model"
    precision: str = "auto"


@dataclass(frozen=True)
class SystemSpec:
    """A routed system's parts, wherever they were read from."""

    expert_names: tuple[str, ...]
    expert_dirs: tuple[Path, ...]
    fine_centroids: np.ndarray  # (m, d)
    owns: np.ndarray            # (n, m) bool
    routing: str                # the rule: paper or released
    lam: float
    lambda_source: str          # "validation", or where else the lambda came from
    encoder: EncoderSpec
    source: Path
    fingerprint: str            # what identifies the trained system (its stages' fingerprints)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def read_system(path: str | Path) -> SystemSpec:
    """The system in a bundle or a run folder (errors name what is missing and the command that
    makes it)."""
    path = Path(path)
    return bundle_system(path) if is_bundle(path) else run_system(RunLayout(path))


def evaluated_routing(layout: RunLayout) -> tuple[str, float, str]:
    """(rule, lambda, its source) the run's evaluate stage used for MoDE; the paper's rule and 0.2
    before evaluate has run."""
    if not layout.results.is_file():
        return "paper", 0.2, "default (the run has not been evaluated)"
    results = json.loads(layout.results.read_text(encoding="utf-8"))
    chosen = results.get("lambda", {}).get("MoDE", {})
    return results.get("routing", "paper"), float(chosen.get("value", 0.2)), chosen.get("source", "config")


def run_encoder(layout: RunLayout) -> EncoderSpec:
    """The encoder the embed stage used: its SimCSE-adapted folder, or the model it named."""
    model, pooling = run_encoder_spec(layout.embed)
    return EncoderSpec(model, pooling, require_manifest(layout.embed, "embed").get("precision", "auto"))


def run_fingerprint(layout: RunLayout, routing: tuple[str, float, str]) -> str:
    """The trained system's identity: its embed, cluster and train stages, the added experts and
    the routing (rule and lambda)."""
    stages = [require_manifest(layout.stage(s), s)["fingerprint"] for s in ("embed", "cluster", "train")]
    return combine("system", stages, added_fingerprint(layout), routing[:2])


def run_system(layout: RunLayout) -> SystemSpec:
    experts = load_experts(layout)
    fine = np.load(layout.fine_centroids)
    rule, lam, source = routing = evaluated_routing(layout)
    return SystemSpec(tuple(e.name for e in experts), tuple(e.path for e in experts), fine,
                      ownership(experts, fine.shape[0]), rule, lam, source, run_encoder(layout), layout.root,
                      run_fingerprint(layout, routing))


def bundle_system(folder: Path) -> SystemSpec:
    meta = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / BUNDLE_FILE}: format {meta.get('format')!r}, this moda reads {FORMAT!r}; "
                         "export the run again with this moda (moda export RUN OUT)")
    encoder = dict(meta["encoder"])
    if encoder.pop("bundled", False):
        encoder["model"] = str(folder / encoder["model"])
    routing = meta["routing"]
    return SystemSpec(tuple(e["name"] for e in meta["experts"]), tuple(folder / e["folder"] for e in meta["experts"]),
                      np.load(folder / routing["fine_centroids"]), np.load(folder / routing["owns"]),
                      routing["rule"], float(routing["lambda"]), routing["lambda_source"], EncoderSpec(**encoder),
                      folder, meta["fingerprint"])
