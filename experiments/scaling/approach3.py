"""Chinchilla Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to every run's final loss.

As in Hoffmann et al. (2022), appendix D.2: with A = exp(a), B = exp(b), E = exp(e),
minimize the sum over runs of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L),
delta = 1e-3, by L-BFGS from every point of the grid alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4,500 starts), and keep the best.

All starts run at once (`lbfgs.minimize_many`) in float64 inside a `jax.enable_x64` scope,
so the process-wide default stays float32. An item stops when a step lowers the objective
by at most `FTOL` relative to it: the Huber sum is about 1e-3 on real data, so scipy's
default test (relative to max(|f|, 1)) would stop far from the optimum, and in this
objective's shallow valleys a looser 1e-9 stops some fits mid-descent (13 of 200 bootstrap
refits of docs/isoflop_cpu/runs.csv ended more than 0.1% above their own optimum).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.scaling import lbfgs
from experiments.scaling.laws import ChinchillaLaw

HUBER_DELTA = 1e-3
PARAMS = ("a", "b", "e", "alpha", "beta")  # column order of every parameter array here
PAPER_GRID = {
    "a": np.arange(0, 30, 5.0),
    "b": np.arange(0, 30, 5.0),
    "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5),
    "beta": np.arange(0, 2.5, 0.5),
}
MAX_LANES = 512  # starts minimized side by side; more only lengthens the tail at the end
FTOL = 1e-12
GTOL = 1e-12  # ends fits that reach f = 0 (noise-free data), where a relative ftol cannot


def initial_grid(**values) -> np.ndarray:
    """Starting points [S, 5] from the product of per-parameter values (`PAPER_GRID` by
    default; override any of a, b, e, alpha, beta)."""
    grid = {**PAPER_GRID, **values}
    return np.array(list(itertools.product(*(grid[name] for name in PARAMS))), float)


def law_from_params(params) -> ChinchillaLaw:
    a, b, e, alpha, beta = (float(v) for v in params)
    return ChinchillaLaw(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta)


def params_from_law(law: ChinchillaLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


@dataclasses.dataclass(frozen=True)
class Approach3Fit:
    law: ChinchillaLaw
    objective: float  # Huber sum at the best start's end point
    n_starts: int
    n_at_best: int  # starts that ended within 1e-6 (relative) of the best objective
    seconds: float  # wall time of the minimization, compilation included


def fit_approach3(n_params, tokens, loss, starts=None, *, delta=HUBER_DELTA, max_iter=500, ftol=FTOL) -> Approach3Fit:
    """The best of L-BFGS runs from each row of `starts` (default: the paper's grid)."""
    starts = initial_grid() if starts is None else np.asarray(starts, float)
    t0 = time.perf_counter()
    x, f = _minimize_weighted(
        n_params, tokens, loss, starts, np.zeros(len(starts), int), np.ones((1, len(loss))),
        delta=delta, max_iter=max_iter, ftol=ftol,
    )
    seconds = time.perf_counter() - t0
    best = int(np.argmin(f))
    return Approach3Fit(
        law=law_from_params(x[best]),
        objective=float(f[best]),
        n_starts=len(starts),
        n_at_best=int(np.sum(f <= f[best] * (1 + 1e-6))),
        seconds=seconds,
    )


def refit_resamples(
    n_params, tokens, loss, resamples_RxM, start: ChinchillaLaw, *, delta=HUBER_DELTA, max_iter=500, ftol=FTOL,
) -> list[ChinchillaLaw]:
    """One fit per bootstrap resample (rows of indices into the runs), each started from
    `start` (the fit on all runs): a resample perturbs the data slightly, so a local
    search from the full-data optimum finds its optimum at 1/4,500 of the grid's cost.
    A resample is expressed as per-run weights (how often each run was drawn)."""
    resamples_RxM = np.asarray(resamples_RxM)
    n_resamples = len(resamples_RxM)
    weights_RxM = np.stack([np.bincount(r, minlength=len(loss)) for r in resamples_RxM]).astype(float)
    starts = np.repeat(params_from_law(start)[None], n_resamples, axis=0)
    x, _ = _minimize_weighted(
        n_params, tokens, loss, starts, np.arange(n_resamples), weights_RxM, delta=delta, max_iter=max_iter, ftol=ftol,
    )
    return [law_from_params(p) for p in x]


def objective(law: ChinchillaLaw, n_params, tokens, loss, delta=HUBER_DELTA) -> float:
    """The fit's objective at `law`: how well any parameters, e.g. published ones, fit the data."""
    logs = (np.log(np.asarray(v, float)) for v in (n_params, tokens, loss))
    with jax.enable_x64(True):
        value, _ = jax.jit(huber_value_and_grad)(
            jnp.asarray(params_from_law(law)[None]), jnp.ones((1, len(loss))), *map(jnp.asarray, logs), delta)
        return float(value[0])


def _minimize_weighted(n_params, tokens, loss, starts_SxP, problem_S, weights_RxM, *, delta, max_iter, ftol):
    """Pads every array to a power-of-two size so that similar problems share one compiled
    program; padded runs have weight 0 and padded starts are never loaded."""
    n_starts, n_runs = len(starts_SxP), len(loss)
    S, M, R = _bucket(n_starts), _bucket(n_runs), _bucket(len(weights_RxM))
    pad = lambda a, n: np.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1), mode="edge")
    logs = [pad(np.log(np.asarray(v, float)), M) for v in (n_params, tokens, loss)]
    weights = np.pad(np.asarray(weights_RxM, float), ((0, R - len(weights_RxM)), (0, M - n_runs)))
    with jax.enable_x64(True):
        x, f, _ = _minimize(
            jnp.asarray(pad(starts_SxP, S)), jnp.asarray(pad(np.asarray(problem_S), S)),
            jnp.asarray(weights), *(jnp.asarray(v) for v in logs),
            n_starts, delta, max_iter, ftol, GTOL, n_lanes=min(S, MAX_LANES),
        )
    return np.asarray(x)[:n_starts], np.asarray(f)[:n_starts]


@functools.partial(jax.jit, static_argnames=("n_lanes",))
def _minimize(starts_SxP, problem_S, weights_RxM, log_n_M, log_d_M, log_l_M, n_items, delta, max_iter, ftol, gtol, *, n_lanes):
    def value_and_grad(x_KxP, item_K):
        weights_KxM = weights_RxM[problem_S[item_K]]
        return huber_value_and_grad(x_KxP, weights_KxM, log_n_M, log_d_M, log_l_M, delta)

    return lbfgs.minimize_many(
        value_and_grad, starts_SxP, n_items, n_lanes=n_lanes, max_iter=max_iter, ftol=ftol, gtol=gtol,
    )


def huber_value_and_grad(x_KxP, weights_KxM, log_n_M, log_d_M, log_l_M, delta):
    """The weighted Huber objective and its gradient, written out by hand: about twice as
    fast as autodiff on CPU, where the exp and log of each (start, run) pair dominate."""
    a, b, e, alpha, beta = (x_KxP[:, i : i + 1] for i in range(5))
    model_term = jnp.exp(a - alpha * log_n_M)  # A / N^alpha
    data_term = jnp.exp(b - beta * log_d_M)  # B / D^beta
    predicted = model_term + data_term + jnp.exp(e)
    residual = jnp.log(predicted) - log_l_M
    clipped = jnp.clip(residual, -delta, delta)
    huber = weights_KxM * (0.5 * clipped**2 + delta * (jnp.abs(residual) - jnp.abs(clipped)))
    d_log_pred = weights_KxM * clipped / predicted  # dHuber/dresidual * dlog(pred)/dpred
    # Materialize before the reductions so XLA does not recompute the exps for each one.
    huber, d_model, d_data, d_log_pred = jax.lax.optimization_barrier(
        (huber, d_log_pred * model_term, d_log_pred * data_term, d_log_pred)
    )
    grad = jnp.stack([
        d_model.sum(1),
        d_data.sum(1),
        d_log_pred.sum(1) * jnp.exp(e[:, 0]),
        -(d_model @ log_n_M),
        -(d_data @ log_d_M),
    ], axis=1)
    return huber.sum(1), grad


def _bucket(n: int) -> int:
    return max(64, 1 << (int(n) - 1).bit_length())
