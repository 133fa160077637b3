"""The config of one run of a sweep, as the sweep resolved it, for launching runs one by one
on a cluster:

  python -m train.pretrain --config=experiments/scaling/sweep_run.py:<run workdir>/planned_config.json --workdir=<run workdir>

`python -m experiments.scaling.sweep --print_commands` writes each planned_config.json and
prints these lines.
"""

import json
import pathlib

import ml_collections


def get_config(planned_config: str):
    path = pathlib.Path(planned_config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no planned config (run the sweep with --print_commands)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
