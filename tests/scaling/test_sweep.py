"""The sweep driver with the real trainer: budgets, the results table, resuming, launch commands."""

import csv
import json
import math
import pathlib

import pytest

import model
from experiments.scaling import sweep, sweep_run
from tests.train.tiny_experiment import tiny_config, write_tiny_corpus
from train import pretrain

SWEEP_FILE = """\
import pathlib
import ml_collections
from tests.train.tiny_experiment import tiny_config


def get_config():
    c = ml_collections.ConfigDict()
    c.kind = "isoflop"
    c.budgets = {budgets!r}
    c.sizes = (2e4, 5e4)
    c.accounting = "model"
    c.min_steps = 5
    c.warmup_fraction = 0.1
    c.shape = ml_collections.ConfigDict(dict(vocab_size=512, max_seq_len=64, head_dim=16, aspect_ratio=16.0))
    c.train = tiny_config(pathlib.Path({corpus!r}), pathlib.Path({cache!r}))
    return c
"""


def _write_sweep(path, corpus, cache, budgets):
    path.write_text(SWEEP_FILE.format(budgets=tuple(budgets), corpus=str(corpus), cache=str(cache)))
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["get_config"]()


def _table(root):
    with (root / "runs.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A sweep of one budget and two sizes, trained to the end."""
    # A fixed name: the split hashes keys that include the directory name, so a numbered
    # directory would make the results depend on the tests that ran before.
    corpus = write_tiny_corpus(tmp_path_factory.mktemp("sweep_corpus", numbered=False))
    cache, root = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("sweep")
    sweep_file = root / "sweep_config.py"
    config = _write_sweep(sweep_file, corpus, cache, [1e9])
    assert sweep.run_sweep(config, root) == []
    return config, root, sweep_file, corpus, cache


def test_each_run_holds_its_budget_and_records_its_results(finished):
    config, root, _, _, _ = finished
    rows = _table(root)
    assert [row["name"] for row in rows] == [run.name for run in sweep.planned_runs(config)]
    assert len({row["n_params"] for row in rows}) == 2
    for row, run in zip(rows, sweep.planned_runs(config)):
        run_model = model.ModelConfig(**sweep.run_config(config, run).model.to_dict())
        assert int(row["n_params"]) == model.param_counts(run_model)["total"]
        assert float(row["flops"]) == pytest.approx(1e9, rel=0.05)
        assert float(row["flops_6n"]) == pytest.approx(6 * int(row["n_params"]) * int(row["tokens"]))
        # Trained: below the loss of a uniform guess over the 512-token vocabulary.
        assert float(row["final_loss"]) < math.log(512) - 0.5
        assert float(row["smoothed_loss"]) < math.log(512) - 0.5
        metrics = pathlib.Path(row["workdir"]) / "metrics.jsonl"
        assert len(metrics.read_text().splitlines()) > run.steps  # the whole curve, one line per step


def test_rerun_skips_finished_runs_and_collects_runs_finished_elsewhere(finished, monkeypatch):
    config, root, _, _, _ = finished
    before = _table(root)

    def must_not_train(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pretrain, "run", must_not_train)
    sweep.run_sweep(config, root)
    assert _table(root) == before
    (root / "runs.csv").unlink()  # as if the runs had been launched one by one on a cluster
    sweep.run_sweep(config, root)
    assert _table(root) == before


def test_launch_commands_reproduce_each_run_config_with_the_sweeps_overrides(finished):
    _, root, sweep_file, corpus, cache = finished
    config = _write_sweep(sweep_file, corpus, cache, [1e9, 2e9])
    config.train.eval.batch_size = 16  # as an override on the sweep's command line would
    commands = sweep.run_sweep(config, root, print_commands=True)
    new_runs = [run for run in sweep.planned_runs(config) if run.budget == 2e9]
    assert len(commands) == len(new_runs) == 2
    for command, run in zip(commands, new_runs):
        planned = root / run.name / sweep.PLANNED_CONFIG
        assert f"--config=experiments/scaling/sweep_run.py:{planned} --workdir={root / run.name}" in command
        rebuilt = sweep_run.get_config(str(planned))
        assert json.loads(rebuilt.to_json()) == json.loads(sweep.run_config(config, run).to_json())
        assert rebuilt.eval.batch_size == 16 and rebuilt.train.steps == run.steps
    with pytest.raises(FileNotFoundError, match="no planned config"):
        sweep_run.get_config(str(root / "nope.json"))


def test_a_relaunch_with_a_changed_plan_stops_rather_than_keep_the_old_rows(finished):
    config, root, _, _, _ = finished
    changed = config.copy_and_resolve_references()
    changed.train.optimizer.lr = 1e-3
    with pytest.raises(ValueError, match=r"in runs.csv, but trained with another config .*\(optimizer.lr\)"):
        sweep.run_sweep(changed, root)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(budgets=(1.0,)), r"the plan has no runs \(config.budgets=\(1.0,\)"),
        (dict(sizes=(2e4, -5e4)), r"config.sizes=\(20000.0, -50000.0\): \[-50000.0\] not positive"),
    ],
)
def test_an_empty_or_negative_plan_is_an_error(finished, tmp_path, change, message):
    config = finished[0].copy_and_resolve_references()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(config, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
