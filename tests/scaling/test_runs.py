"""Reading results tables and loss curves."""

import json

import numpy as np
import pytest

from experiments.scaling import runs as runs_io


def test_tokens_from_flops_and_flops_from_tokens(tmp_path):
    (tmp_path / "c.csv").write_text("n_params,flops,smoothed_loss\n1e6,6e12,3.0\n")
    (tmp_path / "d.csv").write_text("n_params,tokens,smoothed_loss\n1e6,1e6,3.0\n")
    assert runs_io.load_runs(tmp_path / "c.csv").tokens == pytest.approx([1e6])
    assert runs_io.load_runs(tmp_path / "d.csv").flops == pytest.approx([6e12])


def test_flops_6nd_uses_the_chosen_parameter_count(tmp_path):
    (tmp_path / "r.csv").write_text("n_params,n_params_nonembed,tokens,flops,smoothed_loss\n2e6,1e6,1e6,1.5e13,3.0\n")
    runs = runs_io.load_runs(tmp_path / "r.csv", n_col="n_params_nonembed", flops_6nd=True)
    assert runs.flops == pytest.approx([6e12])


def test_without_highest_loss_drops_k_runs(tmp_path):
    (tmp_path / "r.csv").write_text("n_params,tokens,smoothed_loss\n" + "".join(f"{i + 1},1,{l}\n" for i, l in enumerate([3, 9, 2, 8, 4])))
    kept = runs_io.load_runs(tmp_path / "r.csv").without_highest_loss(2)
    assert kept.loss.tolist() == [3, 2, 4] and kept.n_params.tolist() == [1, 3, 5]


def test_curve_tokens_from_steps_and_smoothing(tmp_path):
    lines = [{"step": s, "loss": 5.0 - s / 100} for s in range(10, 101, 10)] + [{"step": 100, "eval_loss": 4.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curve = runs_io.load_curve(tmp_path / "metrics.jsonl", n_params=1e6, tokens=1e8, flops=8e14, smoothing_window=3)
    assert curve.tokens == pytest.approx(np.arange(10, 101, 10) * 1e6)
    assert curve.flops == pytest.approx(curve.tokens * 8e6)  # the table's accounting: 8e14 / 1e8 per token
    assert curve.loss == pytest.approx(5.0 - np.arange(10, 101, 10) / 100)  # a line, ends included, is kept


def test_smoothing_removes_noise_without_biasing_the_ends():
    rng = np.random.default_rng(0)
    clean = 2.0 + np.linspace(1, 10, 200) ** -0.3  # a loss curve past its first steps
    smoothed = runs_io._smooth(clean + 0.01 * rng.standard_normal(200), 21)
    assert np.std(smoothed - clean) < 0.004
    assert smoothed[-1] == pytest.approx(clean[-1], abs=0.01)
