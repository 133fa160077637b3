"""Closed-form compute-optimal allocation against a numerical minimization, and the
allocation power laws."""

import numpy as np
import pytest
from scipy import optimize

from experiments.scaling.laws import EPOCH_2024, HOFFMANN_2022, ChinchillaLaw, fit_allocation_law


@pytest.mark.parametrize("law", [HOFFMANN_2022, EPOCH_2024, ChinchillaLaw(E=2.0, A=50.0, B=9000.0, alpha=0.6, beta=0.25)])
@pytest.mark.parametrize("flops", [1e15, 1e19, 5.76e23])
def test_closed_form_allocation_minimizes_loss_at_fixed_compute(law, flops):
    def loss_at(log_n):  # D is whatever 6ND = C leaves
        n = np.exp(log_n)
        return law.loss(n, flops / (6 * n))

    numerical = optimize.minimize_scalar(loss_at, bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
    n_opt, d_opt = law.compute_optimal(flops)
    assert np.log(n_opt) == pytest.approx(numerical.x, abs=1e-6)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)
    assert law.tokens_per_param(flops) == pytest.approx(d_opt / n_opt)
    assert law.a + law.b == pytest.approx(1.0)


def test_hoffmann_exponents_and_tokens_per_param():
    # Hoffmann et al. Table 2 (Approach 3): a = 0.46, b = 0.54.
    assert HOFFMANN_2022.a == pytest.approx(0.452, abs=0.01)
    assert HOFFMANN_2022.b == pytest.approx(0.548, abs=0.01)
    # Epoch's refit implies about 20 tokens per parameter at Chinchilla's budget.
    assert EPOCH_2024.tokens_per_param(5.76e23) == pytest.approx(20, rel=0.3)


def test_allocation_law_fit_recovers_power_laws():
    flops = np.geomspace(1e17, 1e22, 7)
    law = fit_allocation_law(flops, 0.09 * flops**0.5, 1.9 * flops**0.5)
    assert (law.a, law.b) == pytest.approx((0.5, 0.5))
    assert law.n_coef == pytest.approx(0.09) and law.d_coef == pytest.approx(1.9)
    assert law.tokens_per_param(1e20) == pytest.approx(1.9 / 0.09)
