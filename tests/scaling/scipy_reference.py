"""An independent Approach 3 reference: numpy objective and gradient, scipy's L-BFGS-B one
start at a time (the way Hoffmann et al. and Epoch AI fitted)."""

import numpy as np
from scipy import optimize


def huber_objective(params, log_n, log_d, log_l, delta=1e-3):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient."""
    a, b, e, alpha, beta = params
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    softmax = weights / weights.sum(axis=0)
    residual = lse - log_l
    huber = np.where(np.abs(residual) <= delta, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    d_residual = np.clip(residual, -delta, delta)
    grad = np.array([
        np.sum(d_residual * softmax[0]),
        np.sum(d_residual * softmax[1]),
        np.sum(d_residual * softmax[2]),
        -np.sum(d_residual * softmax[0] * log_n),
        -np.sum(d_residual * softmax[1] * log_d),
    ])
    return huber.sum(), grad


def scipy_fit(starts, n_params, tokens, loss, **options):
    """(best params, best objective, objective per start) over L-BFGS-B runs from each start."""
    logs = tuple(np.log(np.asarray(v, float)) for v in (n_params, tokens, loss))
    results = [optimize.minimize(huber_objective, start, args=logs, jac=True, method="L-BFGS-B", options=options)
               for start in starts]
    values = np.array([r.fun for r in results])
    best = int(np.argmin(values))
    return results[best].x, values[best], values
