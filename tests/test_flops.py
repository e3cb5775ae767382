"""Training compute counted from the real model (torch.utils.flop_counter)."""

import json
from pathlib import Path

import pytest

from experts.flops import flops_per_sample, pass_flops, samples_per_epoch

TINY = json.loads((Path(__file__).resolve().parents[1] / "experts/model_configs/moda-tiny.json").read_text())


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
