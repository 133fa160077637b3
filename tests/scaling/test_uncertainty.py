"""Bootstrap intervals and the extrapolation check."""

import numpy as np
import pytest

from experiments.scaling import approach2, kaplan, uncertainty
from experiments.scaling.extrapolation import extrapolation_check
from experiments.scaling.laws import HOFFMANN_2022, KaplanLaw
from tests.scaling.synthetic import isoflop_sweep


def test_percentile_intervals():
    samples = {"x": np.arange(1001.0)}
    assert uncertainty.percentile_intervals(samples, confidence=0.9)["x"] == pytest.approx((50.0, 950.0))


def test_bootstrap_intervals_cover_the_true_exponent():
    n, d, c, loss = isoflop_sweep(noise=0.005, seed=3)

    def fit(indices):
        law, _ = approach2.fit_approach2(n[indices], d[indices], c[indices], loss[indices])
        return law.as_dict()

    samples = uncertainty.bootstrap(fit, uncertainty.resample_indices(len(n), 200, seed=0))
    assert len(samples["a"]) > 150  # a few resamples may lose a budget's bracketing sizes
    low, high = uncertainty.percentile_intervals(samples)["a"]
    assert low < HOFFMANN_2022.a < high
    assert high - low < 0.2


def test_resamples_draw_runs_with_replacement():
    resamples = uncertainty.resample_indices(50, 10, seed=0)
    assert resamples.shape == (10, 50) and resamples.min() >= 0 and resamples.max() < 50
    assert all(len(set(r)) < 50 for r in resamples)


def test_extrapolation_check_on_exact_law_has_no_error():
    truth = KaplanLaw(n_c=8.8e13, d_c=5.4e13, alpha_n=0.076, alpha_d=0.095)
    n, d, c, _ = isoflop_sweep(noise=0.0)
    check = extrapolation_check(kaplan.fit_kaplan_law, n, d, c, truth.loss(n, d), n_held_out_budgets=1)
    assert np.all(check.held_out_flops == c.max())
    assert check.summary()["max_abs_relative_error"] < 1e-4


def test_extrapolation_check_reports_misfit():
    # A law fitted on the smaller budgets cannot know that the largest budget's runs do worse.
    truth = KaplanLaw(n_c=8.8e13, d_c=5.4e13, alpha_n=0.076, alpha_d=0.095)
    n, d, c, _ = isoflop_sweep(noise=0.0)
    loss = np.where(c == c.max(), 1.05, 1.0) * truth.loss(n, d)
    check = extrapolation_check(kaplan.fit_kaplan_law, n, d, c, loss)
    assert check.relative_error == pytest.approx(np.full(9, 1 / 1.05 - 1), abs=1e-4)
