"""The benchmark refuses settings it cannot run, with one line naming the flags, before timing;
the scripts built on its flags load beside it; it traces steps after the timed ones when asked."""

import collections
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--batch_size=3", "--microbatches=2"], "--batch_size must be a multiple of --microbatches"),
        (["--steps=0"], "flag --steps=0: must be at least 1"),
        (["--seq_len=8", "--documents_per_row=9"], "--documents_per_row must be at most --seq_len"),
        (["--compile_only", "--profile_dir=/tmp/unused"], "--profile_dir traces steps, and --compile_only runs none"),
        (
            ["--batch_size=1", "--seq_len=65536", "--attention=xla"],  # the dense scores: 64 GiB per layer
            "GiB per device and the device has",
        ),
    ],
)
def test_impossible_benchmark_settings_are_refused(arguments, expected):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--preset=llama-tiny", "--dtype=float32", *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "step time" not in result.stdout


@pytest.mark.parametrize("module", ["experiments.peers", "align.benchmark"])
def test_scripts_sharing_the_benchmark_flags_define_each_flag_once(module):
    # In a process of its own: absl's flags are global, and other test files define theirs.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", f"import train.benchmark, {module}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr  # DuplicateFlagError on a flag defined twice


@pytest.mark.parametrize(
    "module, arguments, expected",
    [
        ("experiments.peers", ["--nanogpt=/nonexistent", "--mesh=2,1,1", "--remat=full"], "--remat, --mesh: not used by this program"),
        ("align.benchmark", ["--loss_chunk=8"], "--loss_chunk: not used by this program"),
    ],
)
def test_scripts_refuse_the_shared_flags_they_do_not_use(module, arguments, expected):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {expected}"], result.stderr


def test_cpu_devices_of_one_host_share_its_memory():
    """With 8 CPU devices made by XLA, each holds an eighth of the host's RAM: a step that
    needs more than that per device does not fit, though less than the whole RAM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    script = (
        "import os, jax\n"
        "from train import benchmark\n"
        "ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')\n"
        "print(len(jax.local_devices()), benchmark.device_memory_bytes() == ram // 8)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["8", "True"], result.stderr


def test_profile_dir_holds_a_trace_of_the_steps_after_the_timed_ones(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--preset=llama-tiny", "--dtype=float32", "--batch_size=2",
         "--seq_len=32", "--steps=2", f"--profile_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"profile            3 steps traced under {tmp_path}"
    (trace,) = tmp_path.glob("plugins/profile/*/*.trace.json.gz")
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 1  # what TensorBoard reads
    events = collections.Counter(e["name"] for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X")
    assert events["PjitFunction(jit(train_step))"] > 0  # the step is what was traced
    assert events["CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice"] == 3  # and it ran 3 times

