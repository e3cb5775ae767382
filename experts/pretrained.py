"""A pretrained CLIP as the seed: open_clip's `NAME:TAG` names and `hf-hub:` ids.

Why: for most users the seed is a pretrained model (the README's reproduction shows the seed
dominates the result), and open_clip users name one as `ViT-B-32` with `laion2b_s34b_b79k` or as
`hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K`. Both are resolved by open_clip's own loader
(`open_clip.create_model`), which reads the Hugging Face cache; with `HF_HUB_OFFLINE=1`, as on a
cluster without internet, it reads only the cache and a model missing from it is an error naming
it. The architecture comes from the source, not from `train.model`.

The one check open_clip leaves to a warning moda refuses: OpenAI's weights (and a few others) were
trained with QuickGELU, and open_clip's plain `ViT-B-32` builds GELU. The weights load either way
and the model loses accuracy silently, so `ViT-B-32:openai` stops with one line naming
`ViT-B-32-quickgelu:openai`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HF_HUB = "hf-hub:"
QUICKGELU = "-quickgelu"
# open_clip's image preprocessing keys a model's source may set (its PreprocessCfg less `size`, which
# the architecture's image_size gives, and `mode`, always RGB), with open_clip's defaults.
PREPROCESS_DEFAULTS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


@dataclass(frozen=True)
class PretrainedSeed:
    """`model` an open_clip model name with `tag` one of its pretrained tags, or `hf-hub:org/repo`
    (tag empty)."""

    model: str
    tag: str = ""

    @property
    def hub(self) -> bool:
        return self.model.startswith(HF_HUB)

    def __str__(self) -> str:
        return self.model if self.hub else f"{self.model}:{self.tag}"


def parse_pretrained(spec: str) -> PretrainedSeed | None:
    """The pretrained model `train.seed_checkpoint` names, or None when it is a path (a checkpoint,
    a state_dict or .safetensors file, a local-dir folder). `NAME:TAG` is told from a path by the
    colon and by no such path existing."""
    if spec.startswith(HF_HUB):
        if not spec[len(HF_HUB):].strip("/"):
            raise ValueError("train.seed_checkpoint: `hf-hub:` needs a repository (hf-hub:org/repo)")
        return PretrainedSeed(spec)
    if spec.startswith("local-dir:") or ":" not in spec or Path(spec).exists():
        return None
    model, tag = spec.split(":", 1)
    if not model or not tag or "/" in model:
        return None
    return PretrainedSeed(model, tag)


def quickgelu_fix(model: str, tag_wants_quickgelu: bool) -> str:
    """The open_clip model name whose activation matches the weights'."""
    base = model.removesuffix(QUICKGELU)
    return base + QUICKGELU if tag_wants_quickgelu else base


def seed_architecture(seed: PretrainedSeed) -> dict:
    """The open_clip architecture dict of the pretrained model; refuses, in one line, an activation
    that differs from the one its weights were trained with."""
    import open_clip

    if seed.hub:
        try:
            cfg = open_clip.get_model_config(seed.model)
        except Exception as err:  # a hub download or cache miss: name the model and the fix
            raise FileNotFoundError(
                f"train.seed_checkpoint: {seed.model} has no open_clip_config.json in the Hugging Face cache "
                f"(HF_HOME) and cannot be fetched ({type(err).__name__}); download it where there is internet "
                f"(`huggingface-cli download {seed.model[len(HF_HUB):]}`) or point HF_HOME at a cache "
                "that has it") from err
        return dict(cfg)
    cfg = open_clip.get_model_config(seed.model)
    if cfg is None:
        raise ValueError(f"train.seed_checkpoint: {seed.model!r} is not an open_clip model "
                         "(open_clip.list_models() lists them)")
    tag_cfg = open_clip.get_pretrained_cfg(seed.model, seed.tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(seed.model)
        raise ValueError(f"train.seed_checkpoint: {seed.model} has no pretrained tag {seed.tag!r}; "
                         f"its tags: {', '.join(tags) or 'none'}")
    wants, has = bool(tag_cfg.get("quick_gelu", False)), bool(cfg.get("quick_gelu", False))
    if wants != has:
        raise ValueError(
            f"train.seed_checkpoint: the {seed.tag} weights were trained with {'QuickGELU' if wants else 'GELU'} "
            f"but {seed.model} builds {'QuickGELU' if has else 'GELU'}: use "
            f"{quickgelu_fix(seed.model, wants)}:{seed.tag}")
    return dict(cfg)


def seed_state_dict(seed: PretrainedSeed) -> dict:
    """The pretrained weights, loaded by open_clip's own create_model (its pretrained table, the
    hub cache, its key conversions)."""
    import open_clip

    model = open_clip.create_model(seed.model) if seed.hub else \
        open_clip.create_model(seed.model, pretrained=seed.tag)
    return model.state_dict()


def check_model_matches(train_model: str, default_model: str, model_cfg: dict, seed_cfg: dict,
                        seed: PretrainedSeed) -> None:
    """A pretrained seed brings its architecture; a `train.model` set to another one is refused
    (an activation difference alone named as such), the default is left to the seed's."""
    if train_model == default_model:
        return
    same = {k: v for k, v in model_cfg.items() if k != "quick_gelu"} == \
        {k: v for k, v in seed_cfg.items() if k != "quick_gelu"}
    if same and bool(model_cfg.get("quick_gelu")) != bool(seed_cfg.get("quick_gelu")):
        wants = bool(seed_cfg.get("quick_gelu"))
        named = not (train_model.endswith(".json") or ":" in train_model)
        fix = f"use train.model: {quickgelu_fix(train_model, wants)}, or leave" if named else "leave"
        raise ValueError(f"train.model {train_model} builds {'GELU' if wants else 'QuickGELU'} but the seed {seed} "
                         f"was trained with {'QuickGELU' if wants else 'GELU'}: {fix} train.model out "
                         "(a pretrained seed brings its architecture)")
    if not same:
        raise ValueError(f"train.model {train_model} is not the architecture of the seed {seed}: leave "
                         "train.model out (a pretrained seed brings its architecture) or name the seed's model")


def run_architecture(model_cfg: dict, train_model: str, default_model: str, seed_checkpoint: str) -> dict:
    """The architecture a run trains: `train.model`'s (`model_cfg`), or a pretrained seed's, which a
    `train.model` set to another architecture contradicts."""
    seed = parse_pretrained(seed_checkpoint) if seed_checkpoint else None
    if seed is None:
        return model_cfg
    seed_cfg = seed_architecture(seed)
    check_model_matches(train_model, default_model, model_cfg, seed_cfg, seed)
    return seed_cfg


def seed_preprocess(seed_checkpoint: str) -> dict:
    """The image preprocessing the seed's weights expect where it differs from open_clip's defaults:
    a pretrained tag's (SigLIP's webli: mean and std 0.5, `squash`), an `hf-hub:` model's
    open_clip_config.json, a local-dir folder's. {} for everything else (a from-scratch run, a
    checkpoint file), so the runs that trained with the defaults keep their files and fingerprints.

    Why: the trainer builds its transforms from the run's model folder; with the defaults there, a
    SigLIP seed would be fine-tuned (and every expert exported and evaluated) on wrongly normalised
    pixels, a silent loss of accuracy."""
    if not seed_checkpoint:
        return {}
    seed = parse_pretrained(seed_checkpoint)
    if seed is not None and seed.hub:
        from huggingface_hub import hf_hub_download  # the cache open_clip reads, offline with HF_HUB_OFFLINE

        config = Path(hf_hub_download(seed.model[len(HF_HUB):], "open_clip_config.json"))
        given = json.loads(config.read_text(encoding="utf-8")).get("preprocess_cfg", {})
    elif seed is not None:
        import open_clip

        given = open_clip.get_pretrained_cfg(seed.model, seed.tag) or {}
    else:
        config = Path(seed_checkpoint.removeprefix("local-dir:")) / "open_clip_config.json"
        given = json.loads(config.read_text(encoding="utf-8")).get("preprocess_cfg", {}) if config.is_file() else {}
    return non_default_preprocess(given)


def non_default_preprocess(given: dict) -> dict:
    """The preprocessing keys of `given` whose values differ from open_clip's defaults (lists for
    tuples, as JSON writes them)."""
    out = {}
    for key, default in PREPROCESS_DEFAULTS.items():
        if key in given:
            value = list(given[key]) if isinstance(given[key], (list, tuple)) else given[key]
            if value != default:
                out[key] = value
    return out


def full_preprocess(model_cfg: dict, preprocess_cfg: dict) -> dict:
    """Every preprocessing key explicit: open_clip's defaults, the folder's values over them, the
    size from the architecture. What a bundle writes, so a reader needs no knowledge of defaults."""
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return {"size": size, "mode": "RGB", **PREPROCESS_DEFAULTS, **non_default_preprocess(preprocess_cfg)}
