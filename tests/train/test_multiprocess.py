"""Two JAX processes (4 fake CPU devices each) training one model, as on two hosts: a stop, a
resume and a failure are acted on by both processes alike."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from data import prepare
from tests.train.tiny_experiment import STEPS, tiny_config, write_tiny_corpus

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """An experiment file mirroring `tiny_config`, its token cache prepared. FAIL_AT=P:N makes
    process P's data iterator raise at its Nth batch (N=0: when it is made, before training);
    SIGTERM_IN_SAMPLES=P sends process P a SIGTERM while it writes the samples (as it decodes
    them: `python -m train.pretrain` runs that module as __main__, out of a config file's reach)."""
    corpus, cache = write_tiny_corpus(tmp_path_factory.mktemp("corpus")), tmp_path_factory.mktemp("cache")
    prepare.run(tiny_config(corpus, cache).data)
    path = tmp_path_factory.mktemp("config") / "experiment.py"
    path.write_text(textwrap.dedent(f"""
        import os
        import grain
        from data import pipeline
        from tests.train.tiny_experiment import tiny_config

        class Failing(grain.DatasetIterator):
            def __init__(self, batches, at):
                super().__init__()
                self.batches, self.left = batches, at
                if at == 0:
                    self.fail()
            def fail(self):
                raise OSError(f"a read error on process {{os.environ['JAX_PROCESS_ID']}}")
            def __next__(self):
                self.left -= 1
                if self.left == 0:
                    self.fail()
                return next(self.batches)
            def get_state(self):
                return self.batches.get_state()
            def set_state(self, state):
                self.batches.set_state(state)

        process, at = os.environ.get("FAIL_AT", "-1:0").split(":")
        if os.environ["JAX_PROCESS_ID"] == process:
            train_iterator = pipeline.train_iterator
            pipeline.train_iterator = lambda *args, **kwargs: Failing(train_iterator(*args, **kwargs), int(at))

        if os.environ["JAX_PROCESS_ID"] == os.environ.get("SIGTERM_IN_SAMPLES"):
            import signal
            from data import tokenizer
            decode = tokenizer.Tokenizer.decode
            def decode_and_get_sigterm(self, ids):
                os.kill(os.getpid(), signal.SIGTERM)
                return decode(self, ids)
            tokenizer.Tokenizer.decode = decode_and_get_sigterm

        def get_config():
            return tiny_config({str(corpus)!r}, {str(cache)!r}, steps=int(os.environ.get("STEPS", {STEPS})))
    """))
    return path


def launch_two(config_file, workdir, program="train.pretrain", **env_overrides):
    """`python -m program` as processes 0 and 1 of one job, 4 fake CPU devices each."""
    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    env = {
        **os.environ, **env_overrides, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", program, f"--config={config_file}", f"--workdir={workdir}"],
            cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]


def outputs_of(processes, timeout=180):
    try:
        return [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()


def last_lines(outputs, n=25):
    """Each process's last `n` lines, for a failed assertion's message."""
    return "\n".join(f"--- process {i}:\n" + "\n".join(output.splitlines()[-n:]) for i, output in enumerate(outputs))


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_stop_an_unreadable_checkpoint_or_a_late_failure_on_one_process(config_file, tmp_path):
    workdir = tmp_path / "run"
    processes = launch_two(config_file, workdir)
    deadline = time.time() + 180
    while not (workdir / "checkpoints" / "10" / "commit_success.txt").exists():
        assert time.time() < deadline and processes[0].poll() is None, outputs_of(processes)
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGTERM)  # a preemption notice that reached one host only
    outputs = outputs_of(processes)
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs
    saved = {output.strip().splitlines()[-1].split("at step ")[1].split(";")[0] for output in outputs}
    assert len(saved) == 1, outputs
    stopped = int(saved.pop())
    assert 10 < stopped < STEPS and (workdir / "checkpoints" / str(stopped) / "commit_success.txt").exists()
    first_losses = _losses(workdir)

    # The newest checkpoint readable on process 0 only: both resume from the one before. And
    # once the run is over, process 0's plot fails: it exits as usual, and process 1, which
    # finished, is not aborted by jax's coordination service.
    (workdir / "checkpoints" / str(stopped) / "data" / "process_1-of-2.json").write_text('{"manifest_dig')
    (workdir / "loss_curve.png").mkdir()  # where process 0 saves the plot
    previous = stopped // 10 * 10
    processes = launch_two(config_file, workdir)
    outputs = outputs_of(processes)
    for output in outputs:
        assert f"resumed from the checkpoint at step {previous} in" in output, outputs
    assert "restored here but not on another process" in outputs[0]
    assert [p.returncode for p in processes] == [1, 0], outputs
    assert "IsADirectoryError" in outputs[0].strip().splitlines()[-1], outputs[0]
    resumed_losses = _losses(workdir)
    assert max(resumed_losses) == STEPS
    assert [resumed_losses[s] for s in range(previous + 1, stopped + 1)] == [
        first_losses[s] for s in range(previous + 1, stopped + 1)
    ]


@pytest.mark.parametrize("process, batch", [(1, 15), (0, 0)])
def test_a_process_that_fails_alone_ends_both_at_once_with_its_error(config_file, tmp_path, process, batch):
    """Not after jax's 5-minute shutdown barrier, waiting for a process that waits for it, nor
    the other after the coordinator's 100-second heartbeat timeout, aborted without a word of
    why; and process 0, failing or not, leaves no lock on the workdir (exit handlers do not
    run)."""
    processes = launch_two(config_file, tmp_path / "run", FAIL_AT=f"{process}:{batch}")
    outputs = outputs_of(processes, timeout=60)
    error = f"OSError: a read error on process {process}"
    assert [p.returncode for p in processes] == [1, 1], last_lines(outputs)
    assert outputs[process].strip().splitlines()[-1] == error, last_lines(outputs)
    assert outputs[1 - process].strip().splitlines()[-1] == f"error: process {process} failed: {error}", last_lines(outputs)
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_sigterm_during_the_samples_stops_both_processes(config_file, tmp_path):
    """The last stop decision is agreed too, after the samples: no process goes on alone."""
    processes = launch_two(config_file, tmp_path / "run", SIGTERM_IN_SAMPLES="1", STEPS="12")
    outputs = outputs_of(processes, timeout=120)
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs
    assert all("SIGTERM: saved the checkpoint at step 12" in output for output in outputs), outputs
