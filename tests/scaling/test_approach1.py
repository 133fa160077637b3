"""Approach 1: the lower envelope of training curves recovers known exponents."""

import numpy as np
import pytest

from experiments.scaling import approach1
from experiments.scaling.laws import HOFFMANN_2022


def _curves(law=HOFFMANN_2022, budgets=(1e18, 1e19, 1e20, 1e21), n_sizes=9, span=4.0, noise=0.001, seed=0):
    """IsoFLOP runs whose curves follow the law at every point (as if the schedule did not
    matter), each logged at 200 points up to its budget."""
    rng = np.random.default_rng(seed)
    curves = []
    for budget in budgets:
        n_opt, _ = law.compute_optimal(budget)
        for n in np.geomspace(n_opt / span, n_opt * span, n_sizes):
            tokens = np.geomspace(budget / (6 * n) / 1000, budget / (6 * n), 200)
            loss = law.loss(n, tokens) * np.exp(noise * rng.standard_normal(len(tokens)))
            curves.append(approach1.Curve(n_params=n, tokens=tokens, flops=6 * n * tokens, loss=loss))
    return curves


def test_recovers_allocation_exponents():
    law, envelope = approach1.fit_approach1(_curves())
    assert envelope.flops.min() == pytest.approx(1e18) and envelope.flops.max() == pytest.approx(1e21)
    assert law.a == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert law.b == pytest.approx(HOFFMANN_2022.b, abs=0.03)


def test_envelope_is_the_lowest_curve():
    curves = _curves(noise=0.0)
    envelope = approach1.loss_envelope(curves, n_points=50)
    for c, loss in zip(envelope.flops, envelope.loss):
        covering = [np.interp(np.log(c), np.log(k.flops), k.loss) for k in curves if k.flops[0] <= c <= k.flops[-1]]
        assert loss == pytest.approx(min(covering))
    assert np.allclose(6 * envelope.n_params * envelope.tokens, envelope.flops, rtol=1e-9)
