"""Approach 3: the batched L-BFGS fit against scipy, gradients, recovery, bootstrap."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.scaling import approach3
from experiments.scaling.laws import HOFFMANN_2022, ChinchillaLaw
from experiments.scaling.runs import load_runs
from tests.scaling.scipy_reference import huber_objective, scipy_fit
from tests.scaling.synthetic import isoflop_sweep

CHINCHILLA_CSV = pathlib.Path(__file__).parents[2] / "experiments/scaling/data/svg_extracted_data.csv"
# 16 starts from the paper's grid values (scipy takes about 0.3 s per start here).
SMALL_GRID = dict(a=[0.0, 10.0], b=[5.0, 15.0], e=[0.5], alpha=[0.5, 1.0], beta=[0.5, 1.0])


@pytest.fixture(scope="module")
def chinchilla():
    runs = load_runs(CHINCHILLA_CSV, n_col="Model Size", c_col="Training FLOP", loss_col="loss")
    return runs.without_highest_loss(5)


def test_paper_grid_has_4500_starts():
    grid = approach3.initial_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]  # alpha
    assert sorted(set(grid[:, 0])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]  # a


def test_value_and_gradient_match_numpy_reference(chinchilla):
    rng = np.random.default_rng(0)
    params = approach3.initial_grid(**SMALL_GRID) + rng.normal(0, 0.1, (16, 5))
    logs = [np.log(v) for v in (chinchilla.n_params, chinchilla.tokens, chinchilla.loss)]
    with jax.enable_x64(True):
        value, grad = jax.jit(approach3.huber_value_and_grad)(
            jnp.asarray(params), jnp.ones((len(params), len(logs[0]))), *map(jnp.asarray, logs), 1e-3)
    for p, v, g in zip(params, np.asarray(value), np.asarray(grad)):
        ref_value, ref_grad = huber_objective(p, *logs)
        assert v == pytest.approx(ref_value, rel=1e-12)
        assert g == pytest.approx(ref_grad, rel=1e-9, abs=1e-15)


def test_matches_scipy_lbfgs_on_chinchilla(chinchilla):
    starts = approach3.initial_grid(**SMALL_GRID)
    data = chinchilla.n_params, chinchilla.tokens, chinchilla.loss
    ref_params, ref_value, _ = scipy_fit(starts, *data, ftol=1e-15, gtol=1e-12, maxiter=15000)
    fit = approach3.fit_approach3(*data, starts=starts)
    assert fit.objective <= ref_value * (1 + 1e-9)
    assert fit.objective == pytest.approx(ref_value, rel=1e-8)
    assert approach3.params_from_law(fit.law) == pytest.approx(ref_params, rel=1e-4)


def test_recovers_known_law_from_noisy_isoflop_sweep():
    truth = ChinchillaLaw(E=1.8, A=480.0, B=2000.0, alpha=0.35, beta=0.37)
    n, d, _, loss = isoflop_sweep(truth, budgets=np.geomspace(1e17, 1e21, 5), noise=0.002)
    fit = approach3.fit_approach3(n, d, loss)
    assert fit.n_starts == 4500
    assert fit.law.E == pytest.approx(truth.E, rel=0.03)
    assert (fit.law.alpha, fit.law.beta) == pytest.approx((truth.alpha, truth.beta), rel=0.1)
    assert (fit.law.a, fit.law.b) == pytest.approx((truth.a, truth.b), abs=0.02)
    assert fit.law.compute_optimal(1e22)[0] == pytest.approx(truth.compute_optimal(1e22)[0], rel=0.2)


def test_resample_weights_equal_duplicated_runs(chinchilla):
    data = chinchilla.n_params, chinchilla.tokens, chinchilla.loss
    start = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
    resamples = np.random.default_rng(1).integers(0, len(data[0]), size=(3, len(data[0])))
    laws = approach3.refit_resamples(*data, resamples, start=start)
    for indices, law in zip(resamples, laws):
        direct = approach3.fit_approach3(*(v[indices] for v in data), starts=approach3.params_from_law(start)[None])
        assert approach3.params_from_law(law) == pytest.approx(approach3.params_from_law(direct.law), rel=1e-5)


def test_float64_stays_scoped(chinchilla):
    data = chinchilla.n_params, chinchilla.tokens, chinchilla.loss
    approach3.fit_approach3(*data, starts=approach3.params_from_law(HOFFMANN_2022)[None])
    assert jnp.zeros(1).dtype == jnp.float32
