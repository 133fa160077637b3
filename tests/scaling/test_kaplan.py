"""Kaplan-form fits recover known exponents from noisy synthetic losses."""

import pathlib

import numpy as np
import pytest

from experiments.scaling.kaplan import fit_kaplan_law, fit_power_law
from experiments.scaling.laws import KaplanLaw, PowerLaw
from experiments.scaling.runs import load_runs


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


def test_joint_law_fits_a_sweep_where_loss_rises_with_size():
    """In the CPU IsoFLOP sweep the larger models see fewer tokens, so L(N) alone slopes
    upward and its exponent is negative: the joint fit must still start inside its bounds."""
    runs = load_runs(pathlib.Path(__file__).parents[2] / "docs/isoflop_cpu/runs.csv", loss_col="final_loss")
    assert fit_power_law(runs.n_params, runs.loss).exponent < 0
    fit = fit_kaplan_law(runs.n_params, runs.tokens, runs.loss)
    assert fit.alpha_n > 0 and fit.alpha_d > 0
    assert np.allclose(fit.loss(runs.n_params, runs.tokens), runs.loss, rtol=0.05)
