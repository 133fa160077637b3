"""The benchmark refuses settings it cannot run, with one line naming the flags, before timing;
the scripts built on its flags load beside it; it times steps as training runs them, and
traces more of them when asked."""

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


def test_timed_steps_are_each_queued_before_the_one_ahead_is_waited_for():
    """`pipelined_intervals` keeps one step in flight, as training does: the order of
    dispatches and waits, and one interval per timed step. (A subprocess: train.benchmark's
    flags would clash with other modules' in this process.)"""
    script = (
        "from train.benchmark import pipelined_intervals\n"
        "events = []\n"
        "def dispatch():\n"
        "    events.append(('dispatch', sum(e[0] == 'dispatch' for e in events)))\n"
        "    return events[-1][1]\n"
        "times = pipelined_intervals(dispatch, lambda step: events.append(('wait', step)), 3)\n"
        "print(len(times), all(t >= 0 for t in times), events)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    order = [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2), ("wait", 1), ("dispatch", 3),
             ("wait", 2), ("wait", 3)]
    assert result.stdout.strip() == f"3 True {order}"


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


def test_peers_take_their_steps_in_turns():
    """`experiments.peers` times one step of each side per round, and reports each side's median."""
    script = (
        "from experiments.peers import interleaved_medians\n"
        "calls = []\n"
        "def timer(name, seconds):\n"
        "    def time_one():\n"
        "        calls.append(name)\n"
        "        return seconds[sum(c == name for c in calls) - 1]\n"
        "    return time_one\n"
        "medians = interleaved_medians([timer('a', [3, 1, 2]), timer('b', [9, 7, 8])], 3)\n"
        "print(medians, ''.join(calls))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[2, 8] ababab"
