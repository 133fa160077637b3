"""The pretraining config of one run of a sweep, for launching runs one by one on a cluster:

  python -m train.pretrain --config=experiments/scaling/sweep_run.py:<sweep config>,<run name> --workdir=...

`python -m experiments.scaling.sweep --print_commands` prints these lines.
"""

import importlib.util

from experiments.scaling.sweep import planned_runs, run_config


def get_config(arg: str):
    sweep_file, name = arg.rsplit(",", 1)
    spec = importlib.util.spec_from_file_location("sweep_config", sweep_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = module.get_config()
    for run in planned_runs(sweep):
        if run.name == name:
            return run_config(sweep, run)
    raise ValueError(f"{sweep_file}: no run named {name!r}")
