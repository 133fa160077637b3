"""Chinchilla Approach 2: IsoFLOP profiles.

Runs that share a compute budget form an IsoFLOP profile. A parabola in log N fitted to
each profile's losses gives the loss-minimizing size N_opt at that budget; D_opt is read
off the same profile, from a quadratic through the runs' (log N, log D) rather than assumed
to be C / 6N: log D is linear in log N only when C = 6ND, and curved under the model
accounting, whose attention FLOPs per token do not grow with N. Power laws through the
minima give N_opt(C) and D_opt(C).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.scaling.laws import AllocationLaw, fit_allocation_law


def group_budgets(flops, rel_tol: float = 0.1, keys=None) -> tuple[np.ndarray, np.ndarray]:
    """(label per run, budget per label). With `keys` (a sweep's planned budget per run) runs
    with the same key share a budget; else runs whose C are within `rel_tol` of their
    neighbour's do (digitized or rounded budgets are not exactly equal). Labels count up
    with C; a budget is the geometric mean of its runs' C."""
    flops = np.asarray(flops, float)
    labels = np.empty(len(flops), int)
    if keys is not None:
        keys = np.asarray(keys)
        distinct = sorted(set(keys), key=lambda key: np.mean(np.log(flops[keys == key])))
        labels[:] = [distinct.index(key) for key in keys]
    else:
        order = np.argsort(flops)
        gaps = np.diff(np.log(flops[order])) > np.log1p(rel_tol)
        labels[order] = np.concatenate([[0], np.cumsum(gaps)])
    budgets = np.array([np.exp(np.mean(np.log(flops[labels == k]))) for k in range(labels.max() + 1)])
    return labels, budgets


@dataclasses.dataclass(frozen=True)
class IsoflopMinimum:
    flops: float
    n_opt: float
    d_opt: float
    loss_opt: float  # the parabola's value at its minimum
    parabola: tuple[float, float, float]  # L = p0 (log N)^2 + p1 log N + p2


def isoflop_minima(n_params, tokens, flops, loss, rel_tol: float = 0.1, keys=None, dropped=None) -> list[IsoflopMinimum]:
    """One minimum per budget with at least 3 distinct sizes and an upward-curving fit; the
    other budgets are appended to `dropped` (when given) with the reason."""
    n_params, tokens, loss = (np.asarray(v, float) for v in (n_params, tokens, loss))
    labels, budgets = group_budgets(flops, rel_tol, keys)
    dropped = [] if dropped is None else dropped
    minima = []
    for k, budget in enumerate(budgets):
        runs = labels == k
        log_n = np.log(n_params[runs])
        if len(np.unique(log_n)) < 3:
            dropped.append({"flops": float(budget), "runs": int(runs.sum()), "reason": "fewer than 3 distinct sizes"})
            continue
        parabola = np.polyfit(log_n, loss[runs], 2)
        if parabola[0] <= 0:  # no interior minimum: the sizes do not bracket the optimum
            dropped.append({"flops": float(budget), "runs": int(runs.sum()), "reason": "no interior minimum"})
            continue
        log_n_opt = -parabola[1] / (2 * parabola[0])
        log_d_curve = np.polyfit(log_n, np.log(tokens[runs]), 2)
        minima.append(IsoflopMinimum(
            flops=float(budget),
            n_opt=float(np.exp(log_n_opt)),
            d_opt=float(np.exp(np.polyval(log_d_curve, log_n_opt))),
            loss_opt=float(np.polyval(parabola, log_n_opt)),
            parabola=tuple(float(p) for p in parabola),
        ))
    return minima


def fit_approach2(n_params, tokens, flops, loss, rel_tol: float = 0.1, keys=None, dropped=None) -> tuple[AllocationLaw, list[IsoflopMinimum]]:
    dropped = [] if dropped is None else dropped
    minima = isoflop_minima(n_params, tokens, flops, loss, rel_tol, keys, dropped)
    if len(minima) < 2:
        raise ValueError(
            f"Approach 2 needs 2 or more IsoFLOP budgets with a minimum; found {len(minima)} "
            f"(budgets dropped: {dropped})"
        )
    law = fit_allocation_law([m.flops for m in minima], [m.n_opt for m in minima], [m.d_opt for m in minima])
    return law, minima
