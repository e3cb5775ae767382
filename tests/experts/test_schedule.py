"""MoDE's schedule: the seed is the first seed_epochs of one cosine schedule, and the experts and the
baseline continue it (the reference's epoch 27 of 32), instead of restarting a cosine over the new total."""

import re
from pathlib import Path

import pytest

from pipelines.core.config import load_config

pytestmark = pytest.mark.slow
LR = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+.*? LR: ([\d.e-]+)")


def learning_rates(log: Path) -> list[tuple[int, float]]:
    """(epoch, learning rate) of every progress line of a trainer log."""
    return [(int(m.group(1)), float(m.group(3))) for m in LR.finditer(log.read_text())]


def test_experts_continue_the_seeds_cosine_where_it_stopped(tiny_run):
    """The tiny run's seed: 1 of 2 epochs of one schedule, stopped half-way down the cosine; its
    experts and baseline go on from there instead of climbing back up."""
    train = tiny_run["run_dir"] / "train"
    peak = load_config(tiny_run["config"]).train.lr
    seed, expert, baseline = (learning_rates(train / f"{m}.log") for m in ("seed", "expert_000", "baseline"))
    assert seed[-1][1] > 0.3 * peak  # not annealed to zero at the seed's end
    for continued in (expert, baseline):
        assert continued[0][0] == 1  # the epoch counter goes on
        assert continued[0][1] <= seed[-1][1] * 1.05  # the rate goes on down, no jump
        assert continued[-1][1] < 0.1 * peak


def test_an_annealed_seed_has_a_schedule_of_its_own():
    from experts.jobs import seed_schedule_epochs
    from pipelines.core.config import TrainConfig

    assert seed_schedule_epochs(TrainConfig(seed_epochs=27, expert_epochs=5)) == 32  # continued, the default
    assert seed_schedule_epochs(TrainConfig(seed_epochs=27, expert_epochs=5, seed_schedule="annealed")) == 27
