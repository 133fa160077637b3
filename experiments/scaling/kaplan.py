"""Kaplan et al. (2020) fits: L(X) = (X_c / X)^alpha_X for X in N, D, C, optionally plus an
irreducible term, and the joint L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D.

All fits minimize squared errors in log loss, so every run weighs the same whatever its
loss. Without an irreducible term the single-variable law is a straight line in log-log
space (closed form); the others are nonlinear least squares from a few starting points.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from experiments.scaling.laws import KaplanLaw, PowerLaw


def fit_power_law(x, loss, irreducible: bool = False) -> PowerLaw:
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    if not irreducible:
        slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
        return PowerLaw(scale=float(np.exp(-intercept / slope)), exponent=float(-slope))

    log_x, log_loss = np.log(x), np.log(loss)

    def residuals(p):  # p = (log E, exponent * log scale, exponent): the power term is linear in p[1]
        return np.logaddexp(p[0], p[1] - p[2] * log_x) - log_loss

    best = None
    # Starts: E a fraction of the lowest loss, the rest from the line through log(L - E).
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
        E = fraction * loss.min()
        slope, intercept = np.polyfit(log_x, np.log(loss - E), 1)
        result = optimize.least_squares(residuals, [np.log(E), intercept, -slope], method="lm")
        if best is None or result.cost < best.cost:
            best = result
    log_e, log_term, exponent = best.x
    return PowerLaw(scale=float(np.exp(log_term / exponent)), exponent=float(exponent), irreducible=float(np.exp(log_e)))


def fit_kaplan_law(n_params, tokens, loss) -> KaplanLaw:
    log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n_params, tokens, loss))

    def residuals(p):  # p = (alpha_N, alpha_D, log N_c, log D_c)
        alpha_n, alpha_d, log_nc, log_dc = p
        inner = np.logaddexp(alpha_n / alpha_d * (log_nc - log_n), log_dc - log_d)
        return alpha_d * inner - log_l

    # Starts: each term alone explains the loss (the single-variable fits), with the
    # other term's scale spread over a few decades around the data. In an IsoFLOP sweep
    # loss can rise with N (the larger models see fewer tokens), so a single-variable
    # exponent may come out negative; the start is then clipped into the bounds.
    single_n, single_d = fit_power_law(np.exp(log_n), np.exp(log_l)), fit_power_law(np.exp(log_d), np.exp(log_l))
    single_exponents = (max(single_n.exponent, 1e-3), max(single_d.exponent, 1e-3))
    best = None
    for shift in (-4.0, 0.0, 4.0):
        for alpha_n, alpha_d in (single_exponents, (0.076, 0.095)):
            start = [alpha_n, alpha_d, np.log(single_n.scale) + shift, np.log(single_d.scale) + shift]
            result = optimize.least_squares(residuals, start, method="trf", bounds=([1e-4, 1e-4, -np.inf, -np.inf], np.inf))
            if best is None or result.cost < best.cost:
                best = result
    alpha_n, alpha_d, log_nc, log_dc = best.x
    return KaplanLaw(n_c=float(np.exp(log_nc)), d_c=float(np.exp(log_dc)), alpha_n=float(alpha_n), alpha_d=float(alpha_d))
