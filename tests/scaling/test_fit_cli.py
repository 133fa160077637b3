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
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", "3", "--holdout-budgets", "1"])
    assert {"E", "A", "B", "alpha", "beta", "a", "b"} <= result.keys()
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert result["E"] == pytest.approx(HOFFMANN_2022.E, rel=0.05)
    assert result["extrapolation"]["n_held_out"] == 9
    assert result["extrapolation"]["max_abs_relative_error"] < 0.02
    names = {p.rsplit("/", 1)[1] for p in result["plots"]}
    assert names == {f"approach3_{n}.png" for n in ("isoflops", "frontier", "fitted_vs_observed", "n_opt")}
    assert all((sweep / "plots" / name).stat().st_size > 10_000 for name in names)


@pytest.mark.parametrize("approach", ["1", "2"])
def test_allocation_approaches(sweep, capsys, approach):
    # The synthetic curves are smooth: no smoothing, so the envelope sees the law itself.
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", approach, "--bootstrap", "20",
                           "--curve-smoothing", "1", "--plots-dir", str(sweep / f"plots{approach}")])
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert result["b"] == pytest.approx(HOFFMANN_2022.b, abs=0.03)
    low, high = result["intervals"]["n_opt"]
    assert low <= result["n_opt"] <= high
    assert len(result["plots"]) == 3


def test_kaplan(sweep, capsys):
    result = _run(capsys, ["--input", str(sweep / "results.csv"), "--approach", "kaplan", "--irreducible", "--no-plots"])
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
               "--exclude-top-loss", "2"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["n_runs"] == len(n)
    assert result["a"] == pytest.approx(HOFFMANN_2022.a, abs=0.03)
    assert (tmp_path / "plots" / "approach2_isoflops.png").exists()


def test_missing_named_column_is_an_error(sweep):
    with pytest.raises(ValueError, match="no column 'N'"):
        fit.main(["--input", str(sweep / "results.csv"), "--approach", "2", "--n-col", "N"])
