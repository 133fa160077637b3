"""The experiment presets validate on the machines they are written for, and multi-host
launches are checked per process before anything compiles."""

import pathlib
import subprocess

import pytest

from align import config as align_config
from experiments import gpt2_124m, quickstart, tpu_pod
from experiments.align import arithmetic
from model import sharding
from train import config as config_lib


@pytest.mark.parametrize(
    "experiment, n_devices, n_processes",
    [
        (quickstart, 1, 1),
        (quickstart, 8, 1),
        (gpt2_124m, 1, 1),
        (gpt2_124m, 8, 1),
        (tpu_pod, 64, 16),  # v5p-64: 16 hosts of 4 chips
        (tpu_pod, 256, 64),
    ],
)
def test_presets_validate(experiment, n_devices, n_processes):
    config_lib.validate(experiment.get_config(), n_devices, n_processes)


def test_pod_mesh_gives_fsdp_the_remaining_devices():
    mesh = tpu_pod.get_config().mesh.to_dict()
    assert sharding.mesh_shape(mesh, 64) == {"data": 4, "fsdp": 16, "tensor": 1}


@pytest.mark.parametrize(
    "n_devices, n_processes, overrides, message",
    [
        (64, 3, {}, r"config.train.batch_size=512: not divisible by the number of processes \(3\)"),
        (62, 62, {}, r"config.mesh=\{.*'data': 4.*\}: .*62"),
        (64, 16, {"eval.batch_size": 500},
         r"config.eval.batch_size=500: not divisible by the data x fsdp mesh axes \(64\) and processes \(16\)"),
    ],
)
def test_multi_host_mismatches_name_the_key(n_devices, n_processes, overrides, message):
    cfg = tpu_pod.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg, n_devices, n_processes)


@pytest.mark.parametrize("variant", arithmetic.VARIANTS)
def test_post_training_variants_validate(variant):
    align_config.validate(arithmetic.get_config(variant), n_devices=1, n_processes=1)


def test_gpu_benchmarks_refuse_an_unknown_section_before_running_any():
    root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run(
        ["bash", "experiments/gpu_benchmarks.sh", "/nanogpt", "tests", "step", "profile"],
        cwd=root, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == "unknown section 'profile': expected tests, step, peers or generation"
