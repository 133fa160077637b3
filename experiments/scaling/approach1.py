"""Chinchilla Approach 1: the lower envelope of all training curves.

Each run's loss curve is interpolated (linearly in log FLOPs) to a continuous map from
FLOPs spent so far to loss. At each of `n_points` log-spaced FLOP counts the run with the
lowest loss gives N_opt (its size) and D_opt (its tokens at that point); power laws
through these points give N_opt(C) and D_opt(C) (Hoffmann et al. 2022, section 3.1).

The FLOP range defaults to [smallest run's final FLOPs, largest run's final FLOPs]: below
the smallest run's budget every curve is still in its early transient (warmup, a
learning rate far from annealed), where the smallest model always wins.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.scaling.laws import AllocationLaw, fit_allocation_law


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's loss curve: tokens seen, FLOPs spent and loss at each logged point."""

    n_params: float
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray


@dataclasses.dataclass(frozen=True)
class Envelope:
    flops: np.ndarray
    n_params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray


def loss_envelope(curves: list[Curve], n_points: int = 1500, flop_range=None) -> Envelope:
    if flop_range is None:
        final = [c.flops[-1] for c in curves]
        flop_range = (min(final), max(final))
    grid = np.geomspace(*flop_range, n_points)
    log_grid = np.log(grid)
    loss = np.full((len(curves), n_points), np.inf)
    tokens = np.zeros((len(curves), n_points))
    for i, curve in enumerate(curves):
        log_c = np.log(curve.flops)
        covered = (log_grid >= log_c[0]) & (log_grid <= log_c[-1])
        loss[i, covered] = np.interp(log_grid[covered], log_c, curve.loss)
        tokens[i, covered] = np.exp(np.interp(log_grid[covered], log_c, np.log(curve.tokens)))
    best = np.argmin(loss, axis=0)
    reached = np.isfinite(loss[best, np.arange(n_points)])
    columns = np.arange(n_points)[reached]
    sizes = np.array([c.n_params for c in curves], float)
    return Envelope(
        flops=grid[reached], n_params=sizes[best[reached]],
        tokens=tokens[best[reached], columns], loss=loss[best[reached], columns],
    )


def fit_approach1(curves: list[Curve], n_points: int = 1500, flop_range=None) -> tuple[AllocationLaw, Envelope]:
    envelope = loss_envelope(curves, n_points, flop_range)
    return fit_allocation_law(envelope.flops, envelope.n_params, envelope.tokens), envelope
