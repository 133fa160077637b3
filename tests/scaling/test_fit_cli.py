"""`python -m experiments.scaling.fit` end to end on small results tables."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments.scaling import fit
from experiments.scaling.laws import HOFFMANN_2022
from tests.scaling.synthetic import isoflop_sweep

SWEEP_COLUMNS = ["name", "n_params", "n_params_nonembed", "tokens", "flops", "final_loss", "smoothed_loss", "workdir"]


def _write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep's table with each run's metrics.jsonl (train loss every 10 steps, an eval
    line at the end, no token counts: those come from D and the last step)."""
    root = tmp_path_factory.mktemp("sweep")
    n, d, c, loss = isoflop_sweep(HOFFMANN_2022, noise=0.002)
    rows = []
    for i, (n_i, d_i, c_i, loss_i) in enumerate(zip(n, d, c, loss)):
        workdir = root / f"run{i}"
        workdir.mkdir()
        steps = np.arange(10, 1001, 10)
        curve = HOFFMANN_2022.loss(n_i, d_i * steps / 1000) * (loss_i / HOFFMANN_2022.loss(n_i, d_i))
        lines = [{"step": int(s), "loss": float(l), "lr": 1e-3} for s, l in zip(steps, curve)]
        lines.append({"step": 1000, "eval_loss": float(loss_i)})
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        rows.append([f"run{i}", n_i, 0.9 * n_i, d_i, c_i, loss_i, loss_i, f"run{i}"])
    _write_csv(root / "results.csv", SWEEP_COLUMNS, rows)
    return root


def _run(capsys, argv):
    result = fit.main(argv)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    return result


def test_approach3(sweep, capsys):
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", "3", "--holdout-budgets", "1",
                           "--plots-dir", str(sweep / "plots")])
    assert {"E", "A", "B", "alpha", "beta", "a", "b"} <= result.keys()
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert result["E"] == pytest.approx(HOFFMANN_2022.E, rel=0.05)
    assert result["extrapolation"]["n_held_out"] == 9
    assert result["extrapolation"]["max_abs_relative_error"] < 0.02
    names = {p.rsplit("/", 1)[1] for p in result["plots"]}
    # A table without a budget column is no declared IsoFLOP sweep: no IsoFLOP profiles.
    assert names == {f"approach3_{n}.png" for n in ("loss_vs_n", "frontier", "fitted_vs_observed", "n_opt")}
    assert all((sweep / "plots" / name).stat().st_size > 10_000 for name in names)
    assert all((sweep / "plots" / name).with_suffix(".pdf").read_bytes()[:4] == b"%PDF" for name in names)


@pytest.mark.parametrize("approach", ["1", "2"])
def test_allocation_approaches(sweep, capsys, approach):
    # The synthetic curves are smooth: no smoothing, so the envelope sees the law itself.
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", approach, "--bootstrap", "20",
                           "--curve-smoothing", "1", "--plots-dir", str(sweep / f"plots{approach}")])
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert result["b"] == pytest.approx(HOFFMANN_2022.b, abs=0.03)
    low, high = result["intervals"]["n_opt"]
    assert low <= result["n_opt"] <= high
    # frontier and n_opt; IsoFLOP profiles where the approach declares the sweep one (2).
    assert len(result["plots"]) == (3 if approach == "2" else 2)


def test_kaplan(sweep, capsys):
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", "kaplan", "--irreducible"])
    assert result["L(N,D)"]["alpha_n"] > 0 and result["L(N,D)"]["alpha_d"] > 0
    assert result["L(C)"]["irreducible"] > 0
    assert "plots" not in result


def test_other_column_names_and_outliers_from_the_command_line(tmp_path):
    """Chinchilla-style columns (no tokens column: D = C / 6N) and two outliers dropped."""
    n, _, c, loss = isoflop_sweep(HOFFMANN_2022, noise=0.002)
    rows = [[n_i, c_i, l_i] for n_i, c_i, l_i in zip(n, c, loss)] + [[n[0], c[0], 9.0], [n[1], c[1], 8.0]]
    _write_csv(tmp_path / "points.csv", ["Model Size", "Training FLOP", "loss"], rows)
    command = [sys.executable, "-m", "experiments.scaling.fit", "--input", str(tmp_path / "points.csv"),
               "--approach", "2", "--n-col", "Model Size", "--c-col", "Training FLOP", "--loss-col", "loss",
               "--exclude-top-loss", "2", "--plots-dir", str(tmp_path / "plots")]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["n_runs"] == len(n)
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert (tmp_path / "plots" / "approach2_isoflops.png").exists()


def test_missing_named_column_is_an_error(sweep):
    with pytest.raises(ValueError, match="no column 'N'"):
        fit.main(["--input", str(sweep / "results.csv"), "--approach", "2", "--n-col", "N"])


def _table(tmp_path, rows, columns=("n_params", "tokens", "flops", "smoothed_loss")):
    _write_csv(tmp_path / "runs.csv", list(columns), rows)
    return str(tmp_path / "runs.csv")


@pytest.mark.parametrize(
    "cell, message",
    [
        ("nan", r"line 3, column 'smoothed_loss': 'nan' must be a positive finite number"),
        ("-2.5", r"line 3, column 'smoothed_loss': '-2.5' must be a positive finite number"),
        ("0", r"line 3, column 'smoothed_loss': '0' must be a positive finite number"),
        ("", r"line 3, column 'smoothed_loss': empty cell"),
        ("3,1", r"line 3, column 'smoothed_loss': '3,1' is not a number"),
    ],
)
def test_a_bad_cell_is_refused_naming_line_and_column(tmp_path, cell, message):
    n, d, c, loss = isoflop_sweep(HOFFMANN_2022, noise=0.002)
    rows = [[n[i], d[i], c[i], loss[i]] for i in range(len(n))]
    rows[1][3] = cell
    with pytest.raises(ValueError, match=message):
        fit.main(["--input", _table(tmp_path, rows), "--approach", "3"])


def test_a_fit_with_fewer_runs_than_parameters_is_refused(tmp_path):
    rows = [[1e6, 2e7, 1.2e14, 3.0], [2e6, 1e7, 1.2e14, 2.9]]
    with pytest.raises(ValueError, match=r"approach 3 fits 5 parameters and needs at least 6 runs; the table has 2"):
        fit.main(["--input", _table(tmp_path, rows), "--approach", "3"])
    with pytest.raises(ValueError, match=r"--exclude-top-loss=2 would leave none of the 2 runs"):
        fit.main(["--input", _table(tmp_path, rows), "--approach", "2", "--exclude-top-loss", "2"])


def test_holdout_budgets_with_approach_2_is_refused(sweep):
    with pytest.raises(ValueError, match="--holdout-budgets applies to approaches 3 and kaplan, not 2"):
        fit.main(["--input", str(sweep / "results.csv"), "--approach", "2", "--holdout-budgets", "1"])


def test_a_dropped_budget_is_reported(tmp_path, capsys):
    n, d, c, loss = isoflop_sweep(HOFFMANN_2022, noise=0.002)
    rows = [[n[i], d[i], c[i], loss[i]] for i in range(len(n))] + [[3e11, 1e25 / 1.8e12, 1e25, 1.5]]
    result = fit.main(["--input", _table(tmp_path, rows), "--approach", "2"])
    (dropped,) = result["dropped_budgets"]
    assert dropped == {"flops": pytest.approx(1e25), "runs": 1, "reason": "fewer than 3 distinct sizes"}
    assert "approach 2: budget C=1e+25 (1 runs) dropped: fewer than 3 distinct sizes" in capsys.readouterr().err


def test_the_sweeps_budget_column_groups_runs_whatever_the_c_accounting(tmp_path):
    """C = 6N * D spreads one planned budget over a factor of 1.5; the budget column still groups it."""
    n, d, c, loss = isoflop_sweep(HOFFMANN_2022, noise=0.002)
    rows = [[n[i], d[i], c[i] * (1.0 + 0.5 * (i % 3) / 2), c[i], loss[i]] for i in range(len(n))]
    table = _table(tmp_path, rows, columns=("n_params", "tokens", "flops_6n", "budget", "smoothed_loss"))
    result = fit.main(["--input", table, "--approach", "2", "--c-col", "flops_6n"])
    assert len(result["minima"]) == len(set(c)) and result["dropped_budgets"] == []


def test_plots_never_overwrite_files_no_fit_wrote(sweep, tmp_path, capsys):
    (tmp_path / "approach2_n_opt.png").write_bytes(b"a figure of the paper")
    argv = ["--input", str(sweep / "results.csv"), "--approach", "2", "--plots-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"would overwrite \['approach2_n_opt.png'\], which no fit wrote"):
        fit.main(argv)
    assert (tmp_path / "approach2_n_opt.png").read_bytes() == b"a figure of the paper"
    fresh = tmp_path / "fresh"
    fit.main(argv[:-1] + [str(fresh)])
    fit.main(argv[:-1] + [str(fresh)])  # its own files: rewritten
    assert len(list(fresh.glob("*.png"))) == 3
    result = fit.main(["--input", str(sweep / "results.csv"), "--approach", "2"])
    assert "plots" not in result


def test_the_command_line_prints_one_error_line(tmp_path):
    rows = [[1e6, 2e7, 1.2e14, "nan"]]
    done = subprocess.run([sys.executable, "-m", "experiments.scaling.fit", "--input", _table(tmp_path, rows),
                           "--approach", "2"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'runs.csv'}, line 2, column 'smoothed_loss': 'nan' must be a positive finite number"
    ]
