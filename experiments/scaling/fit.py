"""Fit a scaling law to a results table, print it as JSON, and write the plots.

    python -m experiments.scaling.fit --input runs/isoflop/runs.csv --approach 3 --plots-dir runs/isoflop/fit3
    python -m experiments.scaling.fit --input experiments/scaling/data/svg_extracted_data.csv \\
        --n-col "Model Size" --c-col "Training FLOP" --loss-col loss --exclude-top-loss 5 --approach 3

Approaches: 1 (envelope of the loss curves in each run's workdir), 2 (IsoFLOP parabolas),
3 (parametric L(N, D) = E + A/N^alpha + B/D^beta; JSON keys E, A, B, alpha, beta, a, b; the
law sees only N and D, so its allocation at the target is along C = 6ND whatever the table's
C column counts: --flops-6nd puts every approach on that accounting),
kaplan (joint L(N, D) of Kaplan et al., its limits L(N) and L(D), and L(C) on the lowest
loss per budget).
Column defaults are the sweep's table (`runs.DEFAULT_COLUMNS`); see `runs.py` for how D
and C are derived when one is missing; a sweep's `budget` column groups its IsoFLOP runs.
Every cell used must be a positive number (an error names the line and column). Approaches
3 and kaplan refuse a table with no more runs than they have parameters; budgets Approach 2
cannot use (fewer than 3 sizes, no interior minimum) are listed under `dropped_budgets` and on
stderr. Figures are written only with --plots-dir, as `<approach>_<figure>.png` and `.pdf`; a
file there that an earlier fit did not write (`.written_by_fit` lists those) is never
overwritten.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable

import numpy as np

from experiments.scaling import approach1, approach2, approach3, kaplan, plots, runs as runs_io, uncertainty
from experiments.scaling.extrapolation import extrapolation_check
from experiments.scaling.laws import PowerLaw
from train.cli import exit_on_input_error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="results CSV, one row per run")
    parser.add_argument("--approach", required=True, choices=["1", "2", "3", "kaplan"])
    parser.add_argument("--n-col", help=f"parameters column (default {runs_io.DEFAULT_COLUMNS['n']})")
    parser.add_argument("--d-col", help=f"tokens column (default {runs_io.DEFAULT_COLUMNS['d']})")
    parser.add_argument("--c-col", help=f"FLOPs column (default {runs_io.DEFAULT_COLUMNS['c']})")
    parser.add_argument("--loss-col", help=f"loss column (default {runs_io.DEFAULT_COLUMNS['loss']})")
    parser.add_argument("--flops-6nd", action="store_true", help="use C = 6ND with the chosen N column")
    parser.add_argument("--exclude-top-loss", type=int, default=0, metavar="K", help="drop the K highest-loss runs")
    parser.add_argument("--plots-dir", help="write the PNGs into this directory (default: no plots)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="R", help="bootstrap resamples for intervals")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-flops", type=float, help="budget for N_opt, D_opt (default: the largest C)")
    parser.add_argument("--holdout-budgets", type=int, default=0, metavar="K",
                        help="approaches 3, kaplan: also fit without the K largest budgets and score them")
    parser.add_argument("--irreducible", action="store_true", help="kaplan: L(C) with an irreducible term")
    parser.add_argument("--workdir-col", default="workdir", help="approach 1: column of run workdirs")
    parser.add_argument("--curve-loss-key", default="loss", help="approach 1: loss key in metrics.jsonl")
    parser.add_argument("--curve-smoothing", type=int, default=5, help="approach 1: centred window, in logged points")
    return parser.parse_args(argv)


# Parameters of each fit: a fit to fewer runs than this interpolates them and says nothing.
_PARAMETERS = {"3": 5, "kaplan": 4}
_WRITTEN = ".written_by_fit"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.holdout_budgets and args.approach not in ("3", "kaplan"):
        raise ValueError(f"--holdout-budgets applies to approaches 3 and kaplan, not {args.approach}")
    runs = runs_io.load_runs(args.input, args.n_col, args.d_col, args.c_col, args.loss_col, args.flops_6nd)
    runs = runs.without_highest_loss(args.exclude_top_loss)
    needed = _PARAMETERS.get(args.approach, 0) + 1
    if len(runs.loss) < needed:
        raise ValueError(
            f"{args.input}: approach {args.approach} fits {needed - 1} parameters and needs at least "
            f"{needed} runs; the table has {len(runs.loss)}"
        )
    target = args.target_flops or float(runs.flops.max())
    result, figures = FITS[args.approach](runs, args, target)
    result["n_runs"] = len(runs.loss)
    dropped = []
    minima = approach2.isoflop_minima(runs.n_params, runs.tokens, runs.flops, runs.loss, keys=runs.budget_keys, dropped=dropped)
    if args.approach == "2":
        result["dropped_budgets"] = dropped
        for budget in dropped:
            print(f"approach 2: budget C={budget['flops']:.3g} ({budget['runs']} runs) dropped: {budget['reason']}", file=sys.stderr)
    if args.plots_dir:
        # IsoFLOP profiles only for an IsoFLOP sweep: one that says so (approach 2), or whose
        # table names each run's budget; other runs (e.g. the Chinchilla paper's Figure 4
        # points) show in the loss-against-size figure instead.
        if minima and (args.approach == "2" or runs.budget_keys is not None):
            figures["isoflops"] = lambda path: plots.plot_isoflops(path, runs.n_params, runs.flops, runs.loss, minima, runs.budget_keys)
        tag = "kaplan" if args.approach == "kaplan" else f"approach{args.approach}"
        result["plots"] = _write_plots(pathlib.Path(args.plots_dir), {f"{tag}_{name}.png": draw for name, draw in figures.items()})
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


def _write_plots(directory: pathlib.Path, figures: dict[str, Callable]) -> list[str]:
    """Draws each figure into `directory`, refusing files there that no fit wrote."""
    record = directory / _WRITTEN
    ours = set(record.read_text().split()) if record.exists() else set()
    files = {name for png in figures for name in (png, str(pathlib.Path(png).with_suffix(".pdf")))}
    foreign = sorted(name for name in files if (directory / name).exists() and name not in ours)
    if foreign:
        raise ValueError(f"--plots-dir={directory}: would overwrite {foreign}, which no fit wrote; name another directory")
    directory.mkdir(parents=True, exist_ok=True)
    record.write_text("\n".join(sorted(ours | files)) + "\n")
    for name, draw in figures.items():
        draw(directory / name)
    return sorted(str(directory / name) for name in figures)


def _fit_approach1(runs, args, target) -> tuple[dict, dict[str, Callable]]:
    curves = runs_io.load_curves(runs, args.input, args.workdir_col, loss_key=args.curve_loss_key,
                                 smoothing_window=args.curve_smoothing)
    law, envelope = approach1.fit_approach1(curves)
    result = {**law.as_dict(), "target_flops": target, **_allocation_at(law, target), "envelope_points": len(envelope.flops)}
    if args.bootstrap:
        def fit(indices):
            resampled, _ = approach1.fit_approach1([curves[i] for i in indices])
            return {**resampled.as_dict(), **_allocation_at(resampled, target)}
        result["intervals"] = _intervals(fit, len(curves), args)
    grid = np.geomspace(envelope.flops.min(), envelope.flops.max(), 50)
    figures = {
        "frontier": lambda path: plots.plot_frontier(
            path, runs.flops, runs.loss, keys=runs.budget_keys, lines={"envelope of the curves": (envelope.flops, envelope.loss)}),
        "n_opt": lambda path: plots.plot_optimal_size(
            path, envelope.flops, envelope.n_params, {f"Approach 1: $N \\propto C^{{{law.a:.3f}}}$": (grid, law.compute_optimal(grid)[0])}),
    }
    return result, figures


def _fit_approach2(runs, args, target) -> tuple[dict, dict[str, Callable]]:
    law, minima = approach2.fit_approach2(runs.n_params, runs.tokens, runs.flops, runs.loss, keys=runs.budget_keys)
    result = {
        **law.as_dict(), "target_flops": target, **_allocation_at(law, target),
        "minima": [{"flops": m.flops, "n_opt": m.n_opt, "d_opt": m.d_opt, "loss_opt": m.loss_opt} for m in minima],
    }
    if args.bootstrap:
        def fit(indices):
            keys = None if runs.budget_keys is None else runs.budget_keys[indices]
            resampled, _ = approach2.fit_approach2(
                *(v[indices] for v in (runs.n_params, runs.tokens, runs.flops, runs.loss)), keys=keys
            )
            return {**resampled.as_dict(), **_allocation_at(resampled, target)}
        result["intervals"] = _intervals(fit, len(runs.loss), args)
    c_min = np.array([m.flops for m in minima])
    grid = np.geomspace(c_min.min(), max(c_min.max(), target), 50)
    figures = {
        "frontier": lambda path: plots.plot_frontier(
            path, runs.flops, runs.loss, keys=runs.budget_keys, lines={"parabola minima": (c_min, [m.loss_opt for m in minima])}),
        "n_opt": lambda path: plots.plot_optimal_size(
            path, c_min, [m.n_opt for m in minima], {f"Approach 2: $N \\propto C^{{{law.a:.3f}}}$": (grid, law.compute_optimal(grid)[0])}),
    }
    return result, figures


def _fit_approach3(runs, args, target) -> tuple[dict, dict[str, Callable]]:
    fit = approach3.fit_approach3(runs.n_params, runs.tokens, runs.loss)
    law = fit.law
    result = {
        **law.as_dict(), "target_flops": target, **_allocation_at(law, target),
        "objective": fit.objective, "n_starts": fit.n_starts, "n_at_best": fit.n_at_best, "fit_seconds": fit.seconds,
    }
    if args.bootstrap:
        resamples = uncertainty.resample_indices(len(runs.loss), args.bootstrap, args.seed)
        laws = approach3.refit_resamples(runs.n_params, runs.tokens, runs.loss, resamples, start=law)
        rows = [{**resampled.as_dict(), **_allocation_at(resampled, target)} for resampled in laws]
        samples = {name: np.array([row[name] for row in rows]) for name in rows[0]}
        result["intervals"] = uncertainty.percentile_intervals(samples, args.confidence)
    if args.holdout_budgets:
        check = extrapolation_check(lambda *n_d_loss: approach3.fit_approach3(*n_d_loss).law,
                                    runs.n_params, runs.tokens, runs.flops, runs.loss, args.holdout_budgets,
                                    keys=runs.budget_keys)
        result["extrapolation"] = check.summary()
    grid = np.geomspace(runs.flops.min(), max(runs.flops.max(), target), 50)
    n_grid, d_grid = law.compute_optimal(grid)
    minima = approach2.isoflop_minima(runs.n_params, runs.tokens, runs.flops, runs.loss, keys=runs.budget_keys)
    figures = {
        "frontier": lambda path: plots.plot_frontier(
            path, runs.flops, runs.loss, keys=runs.budget_keys, lines={"fitted L at the compute-optimal N, D": (grid, law.loss(n_grid, d_grid))}),
        "fitted_vs_observed": lambda path: plots.plot_fitted_vs_observed(
            path, runs.loss, law.loss(runs.n_params, runs.tokens), runs.flops, "Approach 3: E + A/N^alpha + B/D^beta"),
        "n_opt": lambda path: plots.plot_optimal_size(
            path, [m.flops for m in minima], [m.n_opt for m in minima], {f"Approach 3: $N \\propto C^{{{law.a:.3f}}}$": (grid, n_grid)}),
        "loss_vs_n": lambda path: plots.plot_loss_against_size(
            path, runs.n_params, runs.flops, runs.loss, (n_grid, law.loss(n_grid, d_grid))),
    }
    return result, figures


def _fit_kaplan(runs, args, target) -> tuple[dict, dict[str, Callable]]:
    joint = kaplan.fit_kaplan_law(runs.n_params, runs.tokens, runs.loss)
    labels, budgets = approach2.group_budgets(runs.flops, keys=runs.budget_keys)
    lowest = np.array([runs.loss[labels == k].min() for k in range(len(budgets))])
    compute = kaplan.fit_power_law(budgets, lowest, irreducible=args.irreducible)
    result = {
        "L(N,D)": joint.as_dict(),
        "L(N)": PowerLaw(joint.n_c, joint.alpha_n).as_dict(),  # the joint law's limits
        "L(D)": PowerLaw(joint.d_c, joint.alpha_d).as_dict(),
        "L(C)": compute.as_dict(),
    }
    if args.bootstrap:
        def fit(indices):
            law = kaplan.fit_kaplan_law(*(v[indices] for v in (runs.n_params, runs.tokens, runs.loss)))
            return law.as_dict()
        result["intervals"] = _intervals(fit, len(runs.loss), args)
    if args.holdout_budgets:
        check = extrapolation_check(kaplan.fit_kaplan_law, runs.n_params, runs.tokens, runs.flops, runs.loss,
                                    args.holdout_budgets, keys=runs.budget_keys)
        result["extrapolation"] = check.summary()
    grid = np.geomspace(budgets.min(), budgets.max(), 50)
    figures = {
        "frontier": lambda path: plots.plot_frontier(
            path, runs.flops, runs.loss, keys=runs.budget_keys, lines={f"L(C) fit, exponent {compute.exponent:.3f}": (grid, compute.loss(grid))}),
        "fitted_vs_observed": lambda path: plots.plot_fitted_vs_observed(
            path, runs.loss, joint.loss(runs.n_params, runs.tokens), runs.flops, "Kaplan L(N, D)"),
    }
    return result, figures


FITS = {"1": _fit_approach1, "2": _fit_approach2, "3": _fit_approach3, "kaplan": _fit_kaplan}


def _allocation_at(law, flops: float) -> dict:
    n_opt, d_opt = law.compute_optimal(flops)
    return {"n_opt": float(n_opt), "d_opt": float(d_opt), "tokens_per_param": float(d_opt / n_opt)}


def _intervals(fit, n_runs: int, args) -> dict:
    resamples = uncertainty.resample_indices(n_runs, args.bootstrap, args.seed)
    return uncertainty.percentile_intervals(uncertainty.bootstrap(fit, resamples), args.confidence)


if __name__ == "__main__":
    exit_on_input_error(main)
