"""Extrapolation check: fit on all but the largest compute budget(s), predict the held-out
runs' loss, and report the error."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from experiments.scaling.approach2 import group_budgets


@dataclasses.dataclass(frozen=True)
class ExtrapolationCheck:
    held_out_flops: np.ndarray  # C of each held-out run
    observed: np.ndarray
    predicted: np.ndarray

    @property
    def relative_error(self) -> np.ndarray:
        return self.predicted / self.observed - 1

    def summary(self) -> dict:
        error = np.abs(self.relative_error)
        return {
            "n_held_out": int(len(self.observed)),
            "min_held_out_flops": float(self.held_out_flops.min()),
            "mean_abs_relative_error": float(error.mean()),
            "max_abs_relative_error": float(error.max()),
        }


def extrapolation_check(
    fit: Callable, n_params, tokens, flops, loss, n_held_out_budgets: int = 1, keys=None
) -> ExtrapolationCheck:
    """`fit(n_params, tokens, loss)` returns a law with `.loss(n_params, tokens)`."""
    n_params, tokens, flops, loss = (np.asarray(v, float) for v in (n_params, tokens, flops, loss))
    labels, budgets = group_budgets(flops, keys=keys)
    if len(budgets) <= n_held_out_budgets:
        raise ValueError(f"{len(budgets)} budgets: cannot hold out {n_held_out_budgets} and fit on the rest")
    held_out = labels >= len(budgets) - n_held_out_budgets
    law = fit(n_params[~held_out], tokens[~held_out], loss[~held_out])
    return ExtrapolationCheck(
        held_out_flops=flops[held_out], observed=loss[held_out], predicted=law.loss(n_params[held_out], tokens[held_out]),
    )
