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

from dataclasses import dataclass
from pathlib import Path

HF_HUB = "hf-hub:"
QUICKGELU = "-quickgelu"


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
