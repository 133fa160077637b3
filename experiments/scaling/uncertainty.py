"""Bootstrap over runs: resample the runs with replacement, refit, and report percentile
intervals of every fitted quantity."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


def resample_indices(n_runs: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """[n_resamples, n_runs] indices of runs drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_runs, size=(n_resamples, n_runs))


def bootstrap(fit: Callable[[np.ndarray], Mapping[str, float]], resamples) -> dict[str, np.ndarray]:
    """`fit(indices)` -> named values, once per resample; resamples whose fit raises
    ValueError (too few distinct runs left for the method) are skipped."""
    samples: dict[str, list[float]] = {}
    for indices in resamples:
        try:
            values = fit(indices)
        except ValueError:
            continue
        for name, value in values.items():
            samples.setdefault(name, []).append(float(value))
    return {name: np.array(values) for name, values in samples.items()}


def percentile_intervals(samples: Mapping[str, np.ndarray], confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    tail = 100 * (1 - confidence) / 2
    return {
        name: tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
        for name, values in samples.items()
    }
