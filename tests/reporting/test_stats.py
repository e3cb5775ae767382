"""Intervals for differences between systems: paired over test samples and trainer seeds."""

import numpy as np
import pytest

from reporting.stats import mean_and_std, paired_bootstrap, paired_bootstrap_tasks


def test_a_difference_far_from_zero_is_a_win_and_the_interval_holds_the_mean():
    diff = np.zeros(400)
    diff[:80] = 1  # right on 80 more of 400 samples: +20 points
    interval = paired_bootstrap(diff, resamples=1000, seed=1)
    assert interval.mean == pytest.approx(0.2)
    assert interval.low < 0.2 < interval.high and interval.low > 0
    assert interval.verdict == "ahead"  # one trainer seed: the interval covers test samples only, a lead
    assert paired_bootstrap(np.tile(diff, (2, 1)), resamples=1000, seed=1).verdict == "beat"


def test_a_noise_sized_difference_is_no_significant_difference():
    rng = np.random.default_rng(0)
    diff = rng.choice([-1, 0, 1], size=300, p=[0.1, 0.8, 0.1])  # as often better as worse
    interval = paired_bootstrap(diff, resamples=1000)
    assert interval.low < 0 < interval.high and interval.verdict == "no significant difference"
    assert paired_bootstrap(-np.abs(diff) - 0.5, resamples=200).verdict == "behind"
    assert paired_bootstrap(np.tile(-np.abs(diff) - 0.5, (3, 1)), resamples=200).verdict == "lost"


def test_the_interval_widens_when_trainer_seeds_disagree():
    agreeing = np.tile(np.r_[np.ones(60), np.zeros(240)], (3, 1))  # +20 points on every seed
    disagreeing = agreeing.copy()
    disagreeing[0, :60] = -1  # one seed says -20 points
    narrow = paired_bootstrap(agreeing, resamples=1000)
    wide = paired_bootstrap(disagreeing, resamples=1000)
    assert narrow.seeds == wide.seeds == 3
    assert (wide.high - wide.low) > 2 * (narrow.high - narrow.low)


def test_the_same_inputs_give_the_same_interval():
    diff = np.random.default_rng(2).choice([-1, 0, 1], size=(2, 150))
    assert paired_bootstrap(diff, seed=5) == paired_bootstrap(diff, seed=5)


def test_the_interval_over_tasks_is_the_mean_of_the_per_task_means():
    a, b = np.ones(100), np.zeros(1000)  # +100 points on a small task, 0 on a large one
    interval = paired_bootstrap_tasks([a, b], resamples=300)
    assert interval.mean == pytest.approx(0.5)  # tasks weigh the same, not samples


def test_rounds_drawn_in_chunks_give_the_same_interval_as_at_once(monkeypatch):
    import reporting.stats

    diff = np.random.default_rng(3).choice([-1, 0, 1], size=(2, 200))
    at_once = paired_bootstrap(diff, resamples=100, seed=4)
    monkeypatch.setattr(reporting.stats, "CELLS", 200 * 7)  # 7 rounds at a time
    chunked = paired_bootstrap(diff, resamples=100, seed=4)
    assert chunked.mean == at_once.mean and chunked.seeds == at_once.seeds
    assert 0 < chunked.high - chunked.low < 2 * (at_once.high - at_once.low)


def test_mean_and_standard_deviation_over_seeds():
    assert mean_and_std([0.5, 0.7]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert mean_and_std([0.4]) == (0.4, 0.0)
