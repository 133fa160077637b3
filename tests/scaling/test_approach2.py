"""Approach 2: budget grouping, IsoFLOP minima, and recovery of known exponents."""

import numpy as np
import pytest

from experiments.scaling import approach2
from experiments.scaling.laws import HOFFMANN_2022
from tests.scaling.synthetic import BUDGETS, isoflop_sweep


def test_group_budgets_tolerates_jitter():
    flops = np.array([1.02e19, 3e18, 0.98e19, 3.1e18, 1e20, 2.9e18])
    labels, budgets = approach2.group_budgets(flops)
    assert labels.tolist() == [1, 0, 1, 0, 2, 0]
    assert budgets == pytest.approx([3e18, 1e19, 1e20], rel=0.03)


def test_recovers_allocation_exponents():
    n, d, c, loss = isoflop_sweep(noise=0.002)
    law, minima = approach2.fit_approach2(n, d, c, loss)
    assert [m.flops for m in minima] == pytest.approx(BUDGETS)
    assert law.a == pytest.approx(HOFFMANN_2022.a, abs=0.02)
    assert law.b == pytest.approx(HOFFMANN_2022.b, abs=0.02)
    n_true, d_true = HOFFMANN_2022.compute_optimal(1e20)
    n_fit, d_fit = law.compute_optimal(1e20)
    assert n_fit == pytest.approx(n_true, rel=0.1) and d_fit == pytest.approx(d_true, rel=0.1)


def test_tokens_follow_the_profile_not_6nd():
    # FLOPs per token 8N instead of 6N: D_opt must be read off the runs, not C / 6N.
    n, d, c, loss = isoflop_sweep(noise=0.0)
    minima = approach2.isoflop_minima(n, d * 0.75, c, loss)
    for m in minima:
        assert 8 * m.n_opt * m.d_opt == pytest.approx(m.flops, rel=1e-6)


def test_tokens_follow_a_profile_with_attention_flops():
    # FLOPs per token 6N + a constant (attention, which does not grow with N), as the model
    # accounting counts them: log D is curved in log N, and D_opt still spends the budget.
    n, d, c, loss = isoflop_sweep(noise=0.0)
    per_token = 6 * n + 0.5 * n.min()
    minima = approach2.isoflop_minima(n, c / per_token, c, loss)
    for m in minima:
        assert (6 * m.n_opt + 0.5 * n.min()) * m.d_opt == pytest.approx(m.flops, rel=2e-3)


def test_budget_without_bracketing_sizes_is_skipped():
    n, d, c, loss = isoflop_sweep(noise=0.0)
    first = c == BUDGETS[0]
    loss[first] = np.linspace(3.0, 2.0, first.sum())  # still falling at the largest size
    minima = approach2.isoflop_minima(n, d, c, loss)
    assert [m.flops for m in minima] == pytest.approx(BUDGETS[1:])
