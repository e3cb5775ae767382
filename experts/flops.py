"""Training compute per sample, counted from the real model: what every row of the report cost.

MoDE's claim is about compute ("four B/16 experts beat L/14 at under 35% of
its GPU-hours"), so the report states the FLOPs behind every row, not only
its samples. `torch.utils.flop_counter.FlopCounterMode` counts one forward
and backward pass of the open_clip model built from the run's own model
config, contrastive loss included, in training mode: with FLIP's patch
dropout active for the masked epochs, without it for the unmasked tune.

The contrastive loss costs a term that grows with the batch (a B x B logit
matrix), so the pass is counted at two small batches, B = 2 and 4, and
FLOPs(B) = a B + b B^2 solved for a and b: the cost per sample at the run's
real batch is then a + b B, without building a batch of 512 on a CPU.
Attention is counted through the math kernel (`flop_counter`): the fused
CPU kernel torch picks otherwise has no formula in the counter, and before
2026-12-03 moda's counts left out attention's scores and weighted values
(4 T^2 w a layer forward; 6.4% of moda-tiny's training pass).
Optimizer steps are not counted (a few FLOPs per parameter per step,
negligible next to the passes at any real batch size).
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def flop_counter():
    """`FlopCounterMode` over the math attention kernel: the fused CPU kernel is an op the counter has
    no formula for, so attention's scores and weighted values (4 T^2 w FLOPs a layer forward) would
    go uncounted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        yield counter


def pass_flops(model_cfg: dict, batch: int, masked: bool) -> int:
    """FLOPs of one forward + backward pass (loss included) over `batch` samples."""
    import open_clip
    import torch

    vision = dict(model_cfg["vision_cfg"])
    if not masked:
        vision["patch_dropout"] = 0.0
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**{**model_cfg, "vision_cfg": vision}, output_dict=True)
    model.train()
    size = vision.get("image_size", 224)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    text = model_cfg.get("text_cfg", {})
    images = torch.randn(batch, 3, *size)
    tokens = torch.randint(0, text.get("vocab_size", 49408), (batch, text.get("context_length", 77)))
    loss_fn = open_clip.ClipLoss()
    with flop_counter() as counter:
        out = model(images, tokens)
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return int(counter.get_total_flops())


def flops_per_sample(model_cfg: dict, batch_size: int) -> dict[str, float]:
    """{"masked": ..., "unmasked": ...}: training FLOPs per sample at this per-device batch size
    (`masked` with the config's patch dropout; the same as `unmasked` without it)."""
    out = {}
    for name, masked in (("masked", True), ("unmasked", False)):
        two, four = pass_flops(model_cfg, 2, masked), pass_flops(model_cfg, 4, masked)
        quadratic = (four - 2 * two) / 8  # b in FLOPs(B) = a B + b B^2
        linear = two / 2 - 2 * quadratic
        out[name] = float(linear + quadratic * batch_size)
    return out


def samples_per_epoch(num_samples: int, batch_size: int, workers: int = 1, world_size: int = 1) -> int:
    """The samples open_clip_train actually draws in one epoch of `num_samples`: whole global batches,
    the same number for every data-loader worker (its get_wds_dataset rounds up)."""
    global_batch = batch_size * world_size
    batches = -(-num_samples // global_batch)
    per_worker = -(-batches // max(1, workers))
    return per_worker * max(1, workers) * global_batch


def parameter_count(model_cfg: dict) -> int:
    """The model's parameters, built on the meta device (no memory, any size)."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg)
    return int(sum(p.numel() for p in model.parameters()))
