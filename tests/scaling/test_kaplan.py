"""Kaplan-form fits recover known exponents from noisy synthetic losses."""

import numpy as np
import pytest

from experiments.scaling.kaplan import fit_kaplan_law, fit_power_law
from experiments.scaling.laws import KaplanLaw, PowerLaw


def _noisy(loss, noise=0.005, seed=0):
    return loss * np.exp(noise * np.random.default_rng(seed).standard_normal(np.shape(loss)))


def test_power_law_without_irreducible_term():
    truth = PowerLaw(scale=8.8e13, exponent=0.076)  # Kaplan et al.'s L(N)
    n = np.geomspace(1e5, 1e9, 30)
    fit = fit_power_law(n, _noisy(truth.loss(n)))
    assert fit.exponent == pytest.approx(0.076, abs=0.005)
    assert fit.irreducible == 0.0


def test_power_law_with_irreducible_term():
    truth = PowerLaw(scale=1e17, exponent=0.3, irreducible=1.7)
    c = np.geomspace(1e14, 1e21, 40)
    fit = fit_power_law(c, _noisy(truth.loss(c), noise=0.002), irreducible=True)
    assert fit.exponent == pytest.approx(0.3, rel=0.05)
    assert fit.irreducible == pytest.approx(1.7, rel=0.05)


def test_joint_law_recovers_both_exponents():
    truth = KaplanLaw(n_c=8.8e13, d_c=5.4e13, alpha_n=0.076, alpha_d=0.095)
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 8), np.geomspace(1e8, 1e11, 8)))
    fit = fit_kaplan_law(n, d, _noisy(truth.loss(n, d), noise=0.002))
    assert fit.alpha_n == pytest.approx(0.076, rel=0.1)
    assert fit.alpha_d == pytest.approx(0.095, rel=0.1)
    assert np.allclose(fit.loss(n, d), truth.loss(n, d), rtol=0.005)
