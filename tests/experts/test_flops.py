"""Training compute counted from the real model (torch.utils.flop_counter)."""

import json
from pathlib import Path

import pytest

from experts.flops import flop_counter, flops_per_sample, pass_flops, samples_per_epoch

TINY = json.loads((Path(__file__).resolve().parents[2] / "experts/model_configs/moda-tiny.json").read_text())


def with_dropout(share):
    return {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": share}}


def test_the_cost_per_sample_at_any_batch_matches_a_pass_counted_at_that_batch():
    per_sample = flops_per_sample(with_dropout(0.0), batch_size=8)
    assert per_sample["unmasked"] == pytest.approx(pass_flops(with_dropout(0.0), 8, masked=False) / 8, rel=1e-9)


def test_patch_dropout_cuts_the_masked_passes_and_not_the_unmasked_tune():
    masked = flops_per_sample(with_dropout(0.5), batch_size=64)
    assert masked["masked"] < 0.8 * masked["unmasked"]
    assert masked["unmasked"] == pytest.approx(flops_per_sample(with_dropout(0.0), batch_size=64)["unmasked"])


def test_one_pass_of_a_linear_layer_counts_as_a_hand_count_says():
    """The counter's own convention, by hand: a (B x i) @ (i x o) matmul is 2 B i o FLOPs forward and
    twice that backward (gradients of input and weight)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    layer = torch.nn.Linear(32, 16, bias=False)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(4, 32, requires_grad=True)).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 4 * 32 * 16


def test_an_epoch_is_whole_batches_for_every_data_loader_worker():
    assert samples_per_epoch(1000, batch_size=64, workers=1) == 1024
    assert samples_per_epoch(1000, batch_size=64, workers=2) == 1024  # 16 batches, 8 a worker
    assert samples_per_epoch(1000, batch_size=64, workers=3) == 18 * 64  # 16 -> 18 for 3 workers
    assert samples_per_epoch(1000, batch_size=32, world_size=2) == 1024


def test_a_one_block_vision_tower_counts_as_a_hand_count_says():
    """A ViT by hand, per image: the patch embedding 2 P (3 p^2) w; one block 24 T w^2 (qkv 6, out 2,
    MLP 16) + 4 T^2 w (scores and weighted values); the projection of the class token 2 w e; with
    P = (S / p)^2 patches and T = P + 1 tokens. Layer norms and softmax are not matmuls and the counter
    leaves them out, as the scaling-law literature's 6 N D does."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size, patch, width, embed, batch = 32, 8, 64, 48, 3
    tower = open_clip.model._build_vision_tower(
        embed, open_clip.model.CLIPVisionCfg(layers=1, width=width, head_width=32, patch_size=patch, image_size=size))
    tower.train()  # no fused inference fast path: every matmul is an op the counter sees
    patches = (size // patch) ** 2
    tokens = patches + 1
    per_image = 2 * patches * 3 * patch ** 2 * width + 24 * tokens * width ** 2 + 4 * tokens ** 2 * width \
        + 2 * width * embed
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tower(torch.randn(batch, 3, size, size))
    assert counter.get_total_flops() < batch * per_image  # torch's fused CPU attention kernel goes uncounted
    with torch.no_grad(), flop_counter() as counter:
        tower(torch.randn(batch, 3, size, size))
    assert counter.get_total_flops() == batch * per_image  # moda's counter counts it
