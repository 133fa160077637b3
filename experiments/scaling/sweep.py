"""Run a scaling sweep (IsoFLOP profiles or an N x D grid) with the pretraining code.

  python -m experiments.scaling.sweep --config=experiments/scaling/isoflop_cpu.py --workdir=runs/isoflop_cpu
  python -m experiments.scaling.sweep ... --print_commands   # one launch command per run, for a cluster

Each run trains in `<workdir>/<run name>` with its learning-rate schedule matched to its
own token budget (as Chinchilla did) and appends one row to `<workdir>/runs.csv`: name,
n_params, n_params_nonembed, tokens (steps x batch x seq_len: positions, the padding of packed
rows included, under 2% on the built-in corpus), flops (the planning accounting), flops_model,
flops_6n, flops_6n_nonembed, budget, final_loss (validation loss over the whole
validation split at the end), smoothed_loss (mean training loss over the last 5% of
steps, at least 3 logged steps), workdir. The sweep is resumable: runs already in the
table are skipped (a relaunch whose plan gives one of them another config stops), a killed run resumes from its checkpoint, and runs finished elsewhere
(from the printed commands) are collected without training. A plan with no runs is an
error.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import shlex

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

import model
from experiments.scaling import plan
from train import config as config_lib
from train import pretrain
from train import workdir as workdir_lib
from train.cli import run_program
from train.metrics import read_metrics

COLUMNS = (
    "name", "n_params", "n_params_nonembed", "tokens", "flops", "flops_model", "flops_6n",
    "flops_6n_nonembed", "budget", "final_loss", "smoothed_loss", "workdir",
)


PLANNED_CONFIG = "planned_config.json"


def model_for(sweep: ml_collections.ConfigDict, target_params: float) -> model.ModelConfig:
    return model.shape_for_params(target_params, **sweep.shape.to_dict())


def planned_runs(sweep: ml_collections.ConfigDict) -> list[plan.PlannedRun]:
    for key in ("budgets", "sizes", "token_counts"):
        bad = [value for value in sweep.get(key, ()) if not value > 0]
        if bad:
            raise ValueError(f"config.{key}={tuple(sweep[key])}: {bad} not positive")
    tokens_per_step = sweep.train.train.batch_size * sweep.train.train.seq_len

    def shape_of(target):
        config = model_for(sweep, target)
        counts = model.param_counts(config)
        flops = model.flops_per_token(config, sweep.train.train.seq_len)["total"]
        return plan.Shape(counts["total"], counts["nonembedding"], flops)

    if sweep.kind == "isoflop":
        return plan.plan_isoflop(
            sweep.budgets, sweep.sizes, shape_of, tokens_per_step=tokens_per_step,
            accounting=sweep.accounting, min_steps=sweep.min_steps,
        )
    if sweep.kind == "grid":
        return plan.plan_grid(
            sweep.sizes, sweep.token_counts, shape_of, tokens_per_step=tokens_per_step,
            accounting=sweep.accounting,
        )
    raise ValueError(f"config.kind={sweep.kind!r}: expected 'isoflop' or 'grid'")


def run_config(sweep: ml_collections.ConfigDict, run: plan.PlannedRun) -> ml_collections.ConfigDict:
    """The pretraining config of one run: its model shape, and steps, warmup, evaluation
    and checkpoints scaled to its own length."""
    cfg = ml_collections.ConfigDict(sweep.train.to_dict())
    shape = dataclasses.asdict(model_for(sweep, run.target_params))
    shape["head_dim"] = 0 if shape["head_dim"] * shape["n_heads"] == shape["d_model"] else shape["head_dim"]
    cfg.model = ml_collections.ConfigDict(shape)
    cfg.train.steps = run.steps
    cfg.optimizer.warmup_steps = max(1, round(sweep.warmup_fraction * run.steps))
    cfg.eval.every_steps = run.steps  # evaluated once, at the end
    cfg.checkpoint.every_steps = max(1, run.steps // 4)
    cfg.train.log_every = 1
    return cfg


def result_row(run: plan.PlannedRun, workdir: pathlib.Path) -> dict | None:
    """The table row of a finished run, or None if it has not finished."""
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = read_metrics(metrics)
    final = [r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] == run.steps]
    if not final:
        return None
    train = [r["loss"] for r in rows if "loss" in r]
    tail = max(3, int(np.ceil(0.05 * len(train))))
    return {
        **{k: getattr(run, k) for k in COLUMNS if hasattr(run, k)},
        "final_loss": final[-1],
        "smoothed_loss": float(np.mean(train[-tail:])),
        "workdir": str(workdir),
    }


def _check_trained_as_planned(sweep, run: plan.PlannedRun, workdir: pathlib.Path) -> None:
    """A run already in the table was trained with the config the plan now gives it (its name
    holds only the budget and size), or the sweep stops naming what differs."""
    if not (workdir / "config.json").exists():
        return
    planned = json.loads(run_config(sweep, run).to_json())
    changes = workdir_lib.differences(workdir_lib.read_config(workdir), planned)
    changed = [key for key, _, _ in workdir_lib.refused_changes(changes)]
    if changed:
        raise ValueError(
            f"{workdir}: in runs.csv, but trained with another config than the plan now gives it "
            f"({', '.join(changed)}); sweep the changed plan into another --workdir"
        )


def run_sweep(sweep: ml_collections.ConfigDict, root: pathlib.Path, print_commands: bool = False) -> list[str]:
    """Trains every planned run not yet in `<root>/runs.csv` and appends its row. With
    `print_commands` nothing trains: each unfinished run's resolved config is written to
    `<root>/<run>/planned_config.json` and one launch command per run is returned, which
    trains exactly that config (overrides given to the sweep included)."""
    runs = planned_runs(sweep)
    if not runs:
        raise ValueError(
            f"the plan has no runs (config.budgets={tuple(sweep.get('budgets', ()))}, "
            f"config.sizes={tuple(sweep.sizes)}, config.min_steps={sweep.get('min_steps')}): "
            "every run was below min_steps or the lists are empty"
        )
    for run in runs:  # every run's config is checked before the first one trains
        config_lib.validate(run_config(sweep, run), jax.device_count(), jax.process_count())
    root.mkdir(parents=True, exist_ok=True)
    table = root / "runs.csv"
    done = set()
    if table.exists():
        with table.open() as f:
            done = {row["name"] for row in csv.DictReader(f)}
    logging.info("%d runs planned, %d already in %s", len(runs), len(done), table)
    commands = []
    for run in runs:
        if run.name in done:
            _check_trained_as_planned(sweep, run, root / run.name)
            continue
        workdir = root / run.name
        row = result_row(run, workdir)
        if row is None and print_commands:
            commands.append(launch_command(run_config(sweep, run), workdir))
            continue
        if row is None:
            pretrain.run(run_config(sweep, run), workdir)
            row = result_row(run, workdir)
        new_table = not table.exists()
        with table.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new_table:
                writer.writeheader()
            writer.writerow(row)
    return commands


def launch_command(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    """Writes the run's resolved config beside its workdir's future files; the command
    trains from it."""
    workdir.mkdir(parents=True, exist_ok=True)
    planned = workdir / PLANNED_CONFIG
    planned.write_text(cfg.to_json(indent=1))
    return shlex.join([
        "python", "-m", "train.pretrain", f"--config=experiments/scaling/sweep_run.py:{planned}",
        f"--workdir={workdir}",
    ])


def main(argv):
    del argv
    commands = run_sweep(flags.FLAGS.config, pathlib.Path(workdir_lib.resolve(flags.FLAGS.workdir)), flags.FLAGS.print_commands)
    for command in commands:
        print(command)


if __name__ == "__main__":
    # Defined here rather than at import: `train.pretrain` has flags of the same names.
    config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per run).")
    flags.DEFINE_bool("print_commands", False, "Print launch commands instead of training.")
    flags.mark_flags_as_required(["config", "workdir"])
    run_program(main)
