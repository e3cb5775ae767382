"""`moda export RUN OUT`: a trained system as one self-describing folder (serving/bundle.py has the
layout), in the Hugging Face hub's layout (a README.md model card with YAML front matter beside the
files), so `huggingface-cli upload`, a colleague's machine or `MoDESystem.load` takes it as is.

Why a copy and not the run folder: a run holds checkpoints, shards and logs (gigabytes to
terabytes at LAION scale) and reads its system across five stages' files; a bundle holds only what
predicts (the experts' weights, a few KB of routing, the encoder) and names its preprocessing in
full, so a reader needs neither moda's defaults nor open_clip's.

The folder is written under a temporary name and renamed into place: a killed export leaves no
half bundle. An existing bundle of the same trained system (its fingerprint) is left as it is.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np

from clustering.encoder import PACKAGED_MODELS
from experts.models import CONFIG_FILE, WEIGHTS_FILE, read_model_config, read_preprocess
from experts.pretrained import full_preprocess
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json, atomic_write_text, file_sha256
from serving.bundle import BUNDLE_FILE, CENTROIDS, FORMAT, OWNS, SystemSpec, is_bundle, run_system

VERSIONED = ("moda", "open_clip_torch", "torch", "sentence-transformers", "numpy")


def versions() -> dict[str, str]:
    """The versions that made the bundle (what a reader compares when numbers differ)."""
    out = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> tuple[Path, bool]:
    """Write the run's system to `out`; (out, whether anything was written)."""
    layout, out = RunLayout(Path(run_dir)), Path(out)
    spec = run_system(layout)
    if out.exists():
        if is_bundle(out) and json.loads((out / BUNDLE_FILE).read_text(encoding="utf-8"))["fingerprint"] \
                == spec.fingerprint:
            return out, False
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not a bundle of this run's system: remove it, choose "
                                  "another folder, or pass --overwrite")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bundle(spec, layout, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out, True


def write_bundle(spec: SystemSpec, layout: RunLayout, folder: Path) -> None:
    experts = []
    for name, source, owned in zip(spec.expert_names, spec.expert_dirs, spec.owns):
        target = folder / "experts" / name
        target.mkdir(parents=True)
        shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
        model_cfg = read_model_config(source)
        atomic_write_json(target / CONFIG_FILE, {"model_cfg": model_cfg,
                                                 "preprocess_cfg": full_preprocess(model_cfg, read_preprocess(source))})
        experts.append({"name": name, "folder": f"experts/{name}", "fine_clusters": np.flatnonzero(owned).tolist()})
    (folder / CENTROIDS).parent.mkdir()
    np.save(folder / CENTROIDS, spec.fine_centroids.astype(np.float32))
    np.save(folder / OWNS, spec.owns.astype(bool))
    encoder = {"model": spec.encoder.model, "pooling": spec.encoder.pooling, "precision": spec.encoder.precision}
    local = Path(spec.encoder.model).expanduser()
    if spec.encoder.model not in PACKAGED_MODELS and local.is_dir():  # a folder travels; a name is named
        shutil.copytree(local, folder / "encoder")
        encoder = {**encoder, "model": "encoder", "bundled": True}
    meta = {
        "format": FORMAT, "fingerprint": spec.fingerprint, "experts": experts,
        "routing": {"rule": spec.routing, "lambda": spec.lam, "lambda_source": spec.lambda_source,
                    "fine_centroids": CENTROIDS, "owns": OWNS,
                    "formula": "routing/weights.py (moda): paper = Ma et al. 2024 section 3.3; released = the "
                               "reference script's", "logit_scale": 100.0},
        "encoder": encoder,
        "versions": versions(),
        "source": {"run": str(layout.root.resolve())},
    }
    atomic_write_text(folder / "README.md", model_card(spec, layout, meta))
    meta["files"] = {p.relative_to(folder).as_posix(): file_sha256(p)
                     for p in sorted(folder.rglob("*")) if p.is_file()}
    atomic_write_json(folder / BUNDLE_FILE, meta)


def model_card(spec: SystemSpec, layout: RunLayout, meta: dict) -> str:
    """The bundle's README.md: what it is, how to load it, its experts and routing, and the run's
    report (the table, its intervals and each row's cost) as the report stage wrote it."""
    report = layout.report_markdown
    evaluated = layout.results_markdown
    if report.is_file():
        results = report.read_text(encoding="utf-8")
    elif evaluated.is_file():
        results = evaluated.read_text(encoding="utf-8") + "\n(The run's report stage has not run: no intervals.)\n"
    else:
        results = "The run was exported before it was evaluated: no results.\n"
    experts = "\n".join(f"| {e['name']} | {len(e['fine_clusters'])} |" for e in meta["experts"])
    encoder = meta["encoder"]
    versions_list = "\n".join(f"- {package}: {version}" for package, version in meta["versions"].items())
    return f"""---
library_name: open_clip
pipeline_tag: zero-shot-image-classification
tags:
- clip
- mixture-of-data-experts
- moda
---

# MoDE system `{layout.root.name}` ({len(meta['experts'])} data experts)

A Mixture of Data Experts (Ma et al., CVPR 2024) trained by moda: {len(meta['experts'])} CLIP experts, each
continued from one seed on its own cluster of the training captions, and a router that weighs them
by how close a task's class names are to the fine cluster centres each expert owns.

## Use

```python
from serving.predict import MoDESystem          # pip install moda (this repository)
system = MoDESystem.load("<this folder>")
probs, weights = system.classify(images, ["cat", "dog"])
```

```bash
moda infer <this folder> 's3://bucket/shards/{{00000..00099}}.tar' --classes classes.txt --out preds/
moda serve <this folder> --port 8000
```

Each expert is a plain open_clip model:
`open_clip.create_model_and_transforms("local-dir:<this folder>/experts/expert_000")`.

## Experts and routing

| expert | fine clusters owned |
|---|---:|
{experts}

Routing: the `{spec.routing}` formula over {spec.fine_centroids.shape[0]} fine centres, lambda {spec.lam:g}
({spec.lambda_source}). Class names are embedded with `{encoder['model']}` (pooling {encoder['pooling']}),
the encoder the captions were clustered with.

## Results (from the run's report)

{results}
## Versions

{versions_list}
"""
