"""Synthetic sweeps from a known law, with multiplicative noise, shared by the tests."""

import numpy as np

from experiments.scaling.laws import HOFFMANN_2022, ChinchillaLaw

BUDGETS = np.array([1e18, 1e19, 1e20, 1e21])


def isoflop_sweep(law: ChinchillaLaw = HOFFMANN_2022, budgets=BUDGETS, n_sizes=9, span=4.0, noise=0.002, seed=0):
    """(N, D, C, L): per budget, n_sizes sizes log-spaced over [N_opt / span, N_opt * span],
    D = C / 6N, and L = law(N, D) * exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    n, c = [], []
    for budget in budgets:
        n_opt, _ = law.compute_optimal(budget)
        n.extend(np.geomspace(n_opt / span, n_opt * span, n_sizes))
        c.extend([budget] * n_sizes)
    n, c = np.array(n), np.array(c)
    d = c / (6 * n)
    loss = law.loss(n, d) * np.exp(noise * rng.standard_normal(len(n)))
    return n, d, c, loss
