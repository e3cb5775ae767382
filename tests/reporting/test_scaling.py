"""Scaling-law fits (reporting/scaling.py): the law is recovered from its own points, the intervals
cover it, and the questions a user asks (where do two curves cross, what is MoDE worth in compute)
have the answers the laws imply."""

import numpy as np
import pytest

from reporting.scaling import (
    PowerLaw,
    compute_multiplier,
    crossing,
    fit_frontier,
    fit_power_law,
    holdout_check,
    interval,
    pareto_frontier,
    refit,
)

TRUE = PowerLaw(a=0.6, alpha=0.35, e_inf=0.12, c0=1e15)
BUDGETS = np.geomspace(1e15, 1e18, 6)


def test_the_fit_recovers_a_alpha_and_the_floor_from_exact_points():
    law = fit_power_law(BUDGETS, TRUE(BUDGETS))
    assert law.a == pytest.approx(TRUE.a, rel=1e-3)
    assert law.alpha == pytest.approx(TRUE.alpha, rel=1e-3)
    assert law.e_inf == pytest.approx(TRUE.e_inf, abs=1e-3)


def test_the_fit_recovers_the_law_from_noisy_points_within_tolerance():
    rng = np.random.default_rng(0)
    compute = np.repeat(BUDGETS, 3)
    law = fit_power_law(compute, TRUE(compute) + rng.normal(0, 0.003, compute.shape))
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.08)
    assert law.e_inf == pytest.approx(TRUE.e_inf, abs=0.03)
    np.testing.assert_allclose(law(BUDGETS), TRUE(BUDGETS), atol=0.01)


def test_refit_intervals_cover_the_true_exponent_and_narrow_with_larger_test_sets():
    widths = []
    for n_test in (2_000, 50_000):
        rng = np.random.default_rng(1)
        observed = rng.binomial(n_test, TRUE(BUDGETS)) / n_test
        draws = rng.binomial(n_test, np.broadcast_to(observed, (150, len(BUDGETS)))) / n_test
        fits = [f for f in refit(BUDGETS, draws) if f is not None]
        assert len(fits) >= 140
        low, high = interval([f.alpha for f in fits])
        assert low <= TRUE.alpha <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_the_frontier_fit_ignores_a_point_a_cheaper_one_beats():
    err = TRUE(BUDGETS)
    worse = np.append(err, err[0] + 0.2)  # a large model at the top budget that did worse than the smallest
    assert fit_frontier(np.append(BUDGETS, BUDGETS[-1]), worse).alpha == pytest.approx(TRUE.alpha, rel=1e-3)


def test_a_redraw_that_leaves_too_few_frontier_points_gives_no_law():
    flat = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])  # one frontier point
    assert refit(BUDGETS, flat) == [None]


def test_a_fit_needs_three_budgets():
    with pytest.raises(ValueError, match="3 or more computes"):
        fit_power_law([1.0, 1.0, 2.0], [0.5, 0.4, 0.3])


def test_the_frontier_keeps_each_point_no_cheaper_point_beats():
    compute = [1, 2, 2, 4, 8, 8]
    err = [0.5, 0.55, 0.45, 0.47, 0.40, 0.30]
    assert pareto_frontier(compute, err).tolist() == [0, 2, 5]


def test_compute_for_inverts_the_law_and_is_infinite_at_its_floor():
    assert TRUE.compute_for(TRUE(3e16)) == pytest.approx(3e16, rel=1e-9)
    assert np.isinf(TRUE.compute_for(TRUE.e_inf))


def test_a_system_equal_to_the_single_model_at_k_times_the_compute_is_worth_k():
    k = 2.5
    better = PowerLaw(TRUE.a * k ** -TRUE.alpha, TRUE.alpha, TRUE.e_inf, TRUE.c0)  # better(C) = TRUE(k C)
    np.testing.assert_allclose(compute_multiplier(TRUE, better, BUDGETS), k, rtol=1e-9)


def test_two_curves_cross_where_their_laws_are_equal_and_not_when_one_is_always_lower():
    # steeper but higher: equal where 0.9 x^-0.5 = 0.6 x^-0.35, x = 1.5^(1/0.15)
    steep = PowerLaw(0.9, 0.5, TRUE.e_inf, TRUE.c0)
    at = crossing(TRUE, steep, 1e15, 1e18)
    assert at == pytest.approx(1e15 * 1.5 ** (1 / 0.15), rel=1e-3)
    lower = PowerLaw(0.5, TRUE.alpha, TRUE.e_inf, TRUE.c0)
    assert crossing(TRUE, lower, 1e15, 1e18) is None


def test_the_holdout_check_predicts_the_largest_budget_from_the_others():
    check = holdout_check(BUDGETS, TRUE(BUDGETS))
    assert check["error"] == pytest.approx(0.0, abs=1e-3)
    assert holdout_check(BUDGETS[:3], TRUE(BUDGETS[:3]))["predicted"] is None  # two budgets left: no fit
