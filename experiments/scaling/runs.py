"""Reading sweep results: the runs table (CSV, one row per run) and each run's loss curve.

The sweep writes the columns of `experiments.scaling.sweep.COLUMNS` (name, parameter counts,
tokens, FLOPs in several accountings, budget, final_loss, smoothed_loss, workdir). Other tables work with their own column names. When the table
has C but no D, tokens are D = C / (6N); with D but no C, C = 6ND.

A run's curve is `<workdir>/metrics.jsonl`: JSON lines with `step` and a loss key (the
training loss `loss` by default; lines without the key, such as evaluation lines, are
skipped). Tokens seen at a line are its `tokens` field when present, otherwise
step * tokens_per_step, where tokens_per_step is the table's `tokens_per_step` column
when present and otherwise the run's D divided by its last logged step (the run ends at
its token budget). FLOPs at a line are the run's C scaled by the fraction of its tokens
seen, which keeps the table's FLOP accounting.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np
from scipy import signal

from experiments.scaling.approach1 import Curve
from train.metrics import read_metrics

DEFAULT_COLUMNS = {"n": "n_params", "d": "tokens", "c": "flops", "loss": "smoothed_loss"}


@dataclasses.dataclass(frozen=True)
class Runs:
    n_params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    rows: list[dict]  # the table's rows as read, for columns the fit does not use
    budget_keys: np.ndarray | None = None  # a sweep's planned budget per run: groups IsoFLOP runs

    def select(self, mask) -> "Runs":
        mask = np.asarray(mask)
        return Runs(
            self.n_params[mask], self.tokens[mask], self.flops[mask], self.loss[mask],
            [row for row, keep in zip(self.rows, mask) if keep],
            None if self.budget_keys is None else self.budget_keys[mask],
        )

    def without_highest_loss(self, k: int) -> "Runs":
        """Drops the k highest-loss runs (Epoch AI's outlier rule for the Chinchilla data)."""
        if k <= 0:
            return self
        if k >= len(self.loss):
            raise ValueError(f"--exclude-top-loss={k} would leave none of the {len(self.loss)} runs")
        return self.select(np.argsort(np.argsort(-self.loss)) >= k)


def load_runs(path, n_col=None, d_col=None, c_col=None, loss_col=None, flops_6nd: bool = False) -> Runs:
    """Columns left as None take the sweep's names; D or C may be missing (see above).
    `flops_6nd` recomputes C = 6ND from the chosen N column, e.g. Kaplan's accounting with
    non-embedding parameters."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    header = rows[0].keys()

    def column(name, default):
        if name is not None and name not in header:
            raise ValueError(f"{path}: no column {name!r}; columns are {list(header)}")
        name = name or default
        if name not in header:
            return None
        # Line 1 is the header: row i is on line i + 2.
        return np.array([_positive(path, line, name, row[name]) for line, row in enumerate(rows, start=2)])

    n = column(n_col, DEFAULT_COLUMNS["n"])
    loss = column(loss_col, DEFAULT_COLUMNS["loss"])
    d = column(d_col, DEFAULT_COLUMNS["d"])
    c = None if flops_6nd else column(c_col, DEFAULT_COLUMNS["c"])
    if n is None or loss is None:
        raise ValueError(f"{path}: needs an N column and a loss column; columns are {list(header)}")
    if d is None and c is None:
        raise ValueError(f"{path}: needs a D (tokens) or a C (FLOPs) column; columns are {list(header)}")
    d = c / (6 * n) if d is None else d
    c = 6 * n * d if c is None else c
    # A sweep's table groups its IsoFLOP runs by planned budget, whatever the C accounting.
    keys = np.array([row["budget"] for row in rows]) if "budget" in header and all(row["budget"] for row in rows) else None
    return Runs(n_params=n, tokens=d, flops=c, loss=loss, rows=rows, budget_keys=keys)


def _positive(path, line: int, column: str, cell: str | None) -> float:
    """A cell as a positive finite number: N, D, C and losses are all positive."""
    where = f"{path}, line {line}, column {column!r}"
    if cell is None or not cell.strip():
        raise ValueError(f"{where}: empty cell")
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"{where}: {cell!r} is not a number") from None
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {cell!r} must be a positive finite number")
    return value


def load_curve(metrics_path, n_params: float, tokens: float, flops: float, loss_key: str = "loss",
               tokens_per_step: float | None = None, smoothing_window: int = 1) -> Curve:
    """One run's curve; `smoothing_window` > 1 smooths the loss over that many logged points
    (centred, so the curve does not lag; see `_smooth`)."""
    lines = [line for line in read_metrics(metrics_path) if loss_key in line and line.get("step", 0) > 0]
    if not lines:
        raise ValueError(f"{metrics_path}: no lines with {loss_key!r} after step 0")
    steps = np.array([line["step"] for line in lines], float)
    if all("tokens" in line for line in lines):
        seen = np.array([line["tokens"] for line in lines], float)
    else:
        seen = steps * (tokens_per_step or tokens / steps.max())
    loss = _smooth(np.array([line[loss_key] for line in lines], float), smoothing_window)
    order = np.argsort(seen, kind="stable")
    return Curve(n_params=n_params, tokens=seen[order], flops=flops * seen[order] / tokens, loss=loss[order])


def load_curves(runs: Runs, table_path, workdir_col: str = "workdir", **curve_options) -> list[Curve]:
    """Curves of every run in the table. A relative workdir is looked up next to the table
    first, then from the current directory."""
    curves = []
    for row, n, d, c in zip(runs.rows, runs.n_params, runs.tokens, runs.flops):
        workdir = pathlib.Path(row[workdir_col])
        if not workdir.is_absolute() and (pathlib.Path(table_path).parent / workdir).exists():
            workdir = pathlib.Path(table_path).parent / workdir
        tokens_per_step = float(row["tokens_per_step"]) if row.get("tokens_per_step") else None
        curves.append(load_curve(workdir / "metrics.jsonl", n, d, c, tokens_per_step=tokens_per_step, **curve_options))
    return curves


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (odd window); the first and last half-windows come from a line
    fitted to the end points, so the ends, where a run's final loss sits, are not biased
    toward their neighbours (Savitzky-Golay, order 1)."""
    window = min(window | 1, len(values) - (1 - len(values) % 2))
    if window < 3:
        return values
    return signal.savgol_filter(values, window, polyorder=1, mode="interp")
