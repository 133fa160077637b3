"""The scaling-law figures, each written by one function as a PNG and, beside it, a PDF.

Uses matplotlib's object API (`Figure`), not pyplot, so no global figure state or
interactive backend is involved.
"""

from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np
from matplotlib import cm, colors
from matplotlib.figure import Figure

from experiments.scaling.approach2 import IsoflopMinimum, group_budgets

PF_DAY = 1e15 * 24 * 3600  # FLOPs


def kaplan_n_opt(flops):
    """Kaplan et al. (2020, Figure 14): N_opt = 1.3e9 (C / PF-day)^0.73 (non-embedding N)."""
    return 1.3e9 * (np.asarray(flops, float) / PF_DAY) ** 0.73


def chinchilla_n_opt(flops):
    """Hoffmann et al. (2022): about 20 tokens per parameter; with C = 6ND, N = sqrt(C / 120)."""
    return np.sqrt(np.asarray(flops, float) / 120)


def plot_isoflops(path, n_params, flops, loss, minima: list[IsoflopMinimum], keys=None) -> None:
    """Loss against N per budget, each budget's parabola, and its minimum; budgets coloured
    on a log scale, with a colorbar where a legend would list more than a handful."""
    labels, budgets = group_budgets(flops, keys=keys)
    palette = _palette(budgets)
    fig, ax = _axes()
    n_params, loss = np.asarray(n_params, float), np.asarray(loss, float)
    for k, budget in enumerate(budgets):
        runs = labels == k
        ax.scatter(n_params[runs], loss[runs], color=palette(budget), s=18, label=f"$C = {_latex(budget)}$")
    for minimum in minima:
        sizes = n_params[labels == np.argmin(np.abs(np.log(budgets / minimum.flops)))]
        grid = np.geomspace(sizes.min(), sizes.max(), 100)
        ax.plot(grid, np.polyval(minimum.parabola, np.log(grid)), color=palette(minimum.flops), lw=1)
        ax.scatter([minimum.n_opt], [minimum.loss_opt], color=palette(minimum.flops), marker="*", s=120, edgecolor="k", zorder=3)
    ax.set_xscale("log")
    ax.set(xlabel="parameters $N$", ylabel="loss", title="IsoFLOP profiles (stars: parabola minima)")
    _legend_or_colorbar(fig, ax, budgets)
    _save(fig, path)


def plot_loss_against_size(path, n_params, flops, loss, frontier: tuple) -> None:
    """Every run's loss against its parameters, coloured by its compute, and the fitted
    compute-optimal frontier `frontier` = (N, L): what a set of runs that is no IsoFLOP sweep
    (e.g. the points of the Chinchilla paper's Figure 4) shows."""
    n_params, flops, loss = (np.asarray(x, float) for x in (n_params, flops, loss))
    fig, ax = _axes()
    norm = colors.LogNorm(flops.min(), flops.max())
    ax.scatter(n_params, loss, c=flops, norm=norm, cmap="viridis", s=14)
    ax.plot(*frontier, color="k", lw=1.5, label="fitted compute-optimal frontier")
    ax.set_xscale("log")
    ax.set(xlabel="parameters $N$", ylabel="loss", title="Loss against model size")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="training FLOPs $C$")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_frontier(path, flops, loss, lines: Mapping[str, tuple] = (), keys=None) -> None:
    """Every run's loss against its compute, the lowest loss per budget, and `lines`
    (label -> (C, L)), e.g. a fitted law's compute-optimal loss or the curves' envelope."""
    flops, loss = np.asarray(flops, float), np.asarray(loss, float)
    labels, budgets = group_budgets(flops, keys=keys)
    lowest = [loss[labels == k].min() for k in range(len(budgets))]
    fig, ax = _axes()
    ax.scatter(flops, loss, s=12, color="0.6", label="runs")
    ax.plot(budgets, lowest, "o-", color="k", lw=1, ms=4, label="lowest loss per budget")
    for label, (x, y) in dict(lines).items():
        ax.plot(x, y, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set(xlabel="training FLOPs $C$", ylabel="loss", title="Loss against compute")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_fitted_vs_observed(path, observed, predicted, flops, title: str = "") -> None:
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    fig, ax = _axes()
    points = ax.scatter(observed, predicted, c=np.log10(flops), s=14, cmap="viridis")
    fig.colorbar(points, ax=ax, label=r"$\log_{10} C$")
    span = [min(observed.min(), predicted.min()), max(observed.max(), predicted.max())]
    ax.plot(span, span, color="k", lw=1, ls="--")
    ax.set(xlabel="observed loss", ylabel="fitted loss", title=title or "Fitted against observed loss")
    _save(fig, path)


def plot_optimal_size(path, flops_points, n_points, lines: Mapping[str, tuple] = ()) -> None:
    """Compute-optimal N against C: the measured optima, `lines` (label -> (C, N)), and the
    Kaplan and Chinchilla allocations for comparison. The axes frame the measured optima and
    `lines`; a reference allocation far from them is cut at the frame."""
    flops_points, n_points = np.asarray(flops_points, float), np.asarray(n_points, float)
    fig, ax = _axes()
    if len(flops_points):
        ax.scatter(flops_points, n_points, color="k", s=20, zorder=3, label="measured optima")
    spans = [s for s in [flops_points] + [np.asarray(x, float) for x, _ in dict(lines).values()] if len(s)]
    grid = np.geomspace(min(s.min() for s in spans), max(s.max() for s in spans), 100)
    sizes = [s for s in [n_points] + [np.asarray(y, float) for _, y in dict(lines).values()] if len(s)]
    for label, (x, y) in dict(lines).items():
        ax.plot(x, y, lw=2, label=label)
    low, high = min(s.min() for s in sizes) / 3, max(s.max() for s in sizes) * 3
    references = {
        r"Kaplan et al.: $N \propto C^{0.73}$": (kaplan_n_opt(grid), "tab:red"),
        r"Chinchilla: $D = 20N$, $N \propto C^{0.5}$": (chinchilla_n_opt(grid), "tab:green"),
    }
    for label, (n, color) in references.items():
        outside = " (below the frame)" if n.max() < low else " (above the frame)" if n.min() > high else ""
        ax.plot(grid, n, ls="--", color=color, label=label + outside)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.set(xlabel="training FLOPs $C$", ylabel="compute-optimal parameters $N$", title="Optimal model size")
    ax.legend(fontsize=8)
    _save(fig, path)


def _latex(x: float) -> str:
    """1.2e+18 as mathtext: 1.2\\times10^{18}."""
    mantissa, exponent = f"{x:.2g}e0".split("e")[:2]
    exponent = int(exponent)
    return f"{mantissa}\\times10^{{{exponent}}}" if exponent else mantissa


def _legend_or_colorbar(fig, ax, budgets, most: int = 6) -> None:
    if len(budgets) <= most:
        ax.legend(fontsize=7)
        return
    norm = colors.LogNorm(min(budgets), max(budgets) * 1.0001)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="training FLOPs $C$")


def _axes():
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    return fig, fig.add_subplot()


def _palette(budgets):
    norm = colors.LogNorm(min(budgets), max(budgets) * 1.0001)
    return lambda budget: cm.viridis(norm(budget))


def _save(fig: Figure, path) -> None:
    """`path` (a PNG) and the same figure as a PDF beside it, for papers."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".pdf"))
