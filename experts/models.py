"""Model folders and trainer checkpoints: the architecture, the local-dir export, the seed.

open_clip loads a model folder (open_clip_config.json +
open_clip_model.safetensors) as `local-dir:<folder>`; open_clip_train writes
checkpoints (state_dict, optimizer, epoch) as `epoch_<n>.pt`. The train stage
turns the second into the first, and a given seed (train.seed_checkpoint)
from either into what the experts start from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from experts.pretrained import parse_pretrained, seed_state_dict
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_path, atomic_write_json

CONFIG_FILE = "open_clip_config.json"  # open_clip's local-dir format
WEIGHTS_FILE = "open_clip_model.safetensors"


def model_config_dict(model: str) -> dict:
    """The open_clip architecture dict for a JSON path, a `local-dir:` folder or a built-in name.

    open_clip is imported only for a built-in name: the import takes seconds,
    and a rerun that skips the stage should not pay it.
    """
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"train.model: model config {path} not found")
        return json.loads(path.read_text(encoding="utf-8"))
    if model.startswith("local-dir:"):
        config = Path(model.removeprefix("local-dir:")) / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"train.model: {config} not found")
        return json.loads(config.read_text(encoding="utf-8"))["model_cfg"]
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"train.model: {model!r} is not an open_clip model, a .json config or local-dir:")
    return cfg


def read_model_config(folder: Path) -> dict:
    """The architecture of a local-dir model folder."""
    return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]


def read_preprocess(folder: Path) -> dict:
    """The image preprocessing a local-dir model folder sets over open_clip's defaults."""
    return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("preprocess_cfg", {})


def write_model_folder(folder: Path, model_cfg: dict, state_dict=None, preprocess_cfg: dict | None = None) -> None:
    """A local-dir model folder; without `state_dict` it holds the architecture only.
    `preprocess_cfg`: what open_clip's transforms take over their defaults (experts/pretrained.py
    `seed_preprocess`); open_clip_train and every reader of the folder build the same transforms."""
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        from safetensors.torch import save_file

        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    atomic_write_json(folder / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}})


def model_files(folder: Path) -> list[Path]:
    """The files of an exported model folder (hashed into the train manifest)."""
    return [folder / CONFIG_FILE, folder / WEIGHTS_FILE]


def _state_dict(checkpoint: Path) -> dict:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in weights.items()}


def export_checkpoint(checkpoint: Path, model_spec: str, folder: Path) -> None:
    """Trainer checkpoint (state_dict + optimizer) -> local-dir model folder, with the architecture
    and preprocessing of the run's model folder (`model_spec`, `local-dir:<train/model_config>`),
    the ones the trainer built the model and its transforms from."""
    source = Path(model_spec.removeprefix("local-dir:"))
    write_model_folder(folder, read_model_config(source), _state_dict(checkpoint), read_preprocess(source))


def ensure_latest(checkpoints: Path) -> bool:
    """Make `epoch_latest.pt` the newest complete checkpoint; False when there is none.

    open_clip_train writes `epoch_latest.pt` atomically, but `epoch_N.pt`
    directly and first: a run killed between the two leaves only `epoch_N.pt`
    (and one killed while saving leaves a truncated one, skipped here).
    """
    import torch

    latest = checkpoints / "epoch_latest.pt"
    numbered = sorted(checkpoints.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    newest_number = int(numbered[-1].stem.split("_")[1]) if numbered else -1
    if latest.is_file():
        try:
            if torch.load(latest, map_location="cpu", weights_only=False)["epoch"] >= newest_number:
                return True
        except Exception:
            latest.unlink()
    for candidate in reversed(numbered):
        try:
            torch.load(candidate, map_location="cpu", weights_only=False)
        except Exception:
            candidate.unlink()
            continue
        tmp = checkpoints / ".epoch_latest.pt.tmp"
        shutil.copyfile(candidate, tmp)
        tmp.replace(latest)
        return True
    return False


def newest_epoch(checkpoints: Path) -> int:
    """The highest N of the folder's `epoch_N.pt` files (-1 for none)."""
    return max((int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_[0-9]*.pt")), default=-1)


def prune_checkpoints(checkpoints: Path, final: int, keep: tuple[int, ...] = ()) -> list[Path]:
    """Delete what no resume or export needs once a model is trained: every checkpoint but its final
    `epoch_<final>.pt` (experts resume the seed's; the registry names each model's) and the epochs
    in `keep` (the seed's, that experts of another phase length continue), including
    `epoch_latest.pt`, a copy of it. Returns what was deleted.

    Why: a checkpoint is about 12 bytes a parameter (weights and AdamW's moments), and every epoch's
    was kept: configs/repro-gpu.yaml's 72 launches wrote about 44 GB on a node with a 64 GB disk.
    While a model trains, the trainer's --delete-previous-checkpoint keeps it to the newest epoch
    and epoch_latest.pt."""
    kept = {f"epoch_{e}.pt" for e in (final, *keep)}
    gone = [p for p in checkpoints.glob("epoch_*.pt") if p.name not in kept]
    gone += list(checkpoints.glob("tmp.pt"))
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


def given_seed(spec: str, layout: RunLayout) -> tuple[Path, int]:
    """Use an existing model as the seed: export it, return a checkpoint to start from and its epoch.

    An open_clip_train checkpoint (optimizer state, epoch counter) is resumed
    by every expert, MoDE's recipe. A bare state_dict file, a `.safetensors`
    file, a `local-dir` model folder (open_clip_model.safetensors) or a
    pretrained open_clip model (`NAME:TAG`, `hf-hub:org/repo`; experts/pretrained.py)
    gives weights only (epoch 0), written once to train/seed_init.pt.
    """
    import torch

    pretrained = parse_pretrained(spec)
    source = Path(spec.removeprefix("local-dir:"))
    if pretrained is not None:
        if not layout.seed_init.is_file():
            with atomic_path(layout.seed_init) as tmp:
                torch.save(seed_state_dict(pretrained), tmp)
        source = layout.seed_init
    elif source.is_dir() or source.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = source / WEIGHTS_FILE if source.is_dir() else source
        if not weights.is_file():
            raise FileNotFoundError(f"train.seed_checkpoint: {weights} not found"
                                    + (" (a local-dir model folder?)" if source.is_dir() else ""))
        with atomic_path(layout.seed_init) as tmp:
            torch.save(load_file(str(weights)), tmp)
        source = layout.seed_init
    if not source.is_file():
        raise FileNotFoundError(f"train.seed_checkpoint: {source} not found (a checkpoint, a state_dict or "
                                ".safetensors file, a local-dir folder, NAME:TAG or hf-hub:org/repo)")
    state = torch.load(source, map_location="cpu", weights_only=False)
    epoch = int(state.get("epoch", 0)) if isinstance(state, dict) else 0
    export_checkpoint(source, f"local-dir:{layout.model_config}", layout.model("seed"))
    return source.resolve(), epoch


def weights_only(checkpoint: Path, out: Path) -> Path:
    """The seed's weights without optimizer state or epoch, at `out`: experts start a fresh schedule."""
    import torch

    with atomic_path(out) as tmp:
        torch.save(_state_dict(checkpoint), tmp)
    return out
