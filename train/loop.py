"""The training loop every method shares: restore or create the state, step, log, evaluate,
checkpoint, stop cleanly on SIGTERM.

A method hands the loop a `Job`: its compiled update, its resumable batch iterator, how to
make a fresh state and the abstract state to restore into, and optional evaluation. The loop
owns everything else: checkpoints (state + data-iterator state + config, so a killed run
resumes on the same trajectory), `metrics.jsonl` and TensorBoard (and W&B), the progress line, the
non-finite policy (`train.nonfinite`), and timing (tokens/s, MFU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from model import sharding
from train import cli, workdir as workdir_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, Progress, peak_flops_per_device
from train.optimizer import applied_learning_rate
from train.state import TrainState
from train.step import batch_sharding

log = logging.getLogger("train")

# Step metrics that are bookkeeping, not for the log.
_UNLOGGED = ("finite", "weight")


class NonFiniteError(RuntimeError):
    pass


# Whether the other processes of a multi-process job may be waiting for this one in a
# collective: from the start of a run (`begin_run`) until its loop has passed its last one. A
# process that fails then must end at once (`train.cli`); after it, its error ends it alone,
# and the others exit as they would.
_may_be_awaited = True


def may_be_awaited() -> bool:
    return _may_be_awaited


def begin_run() -> None:
    """What every training entry point does first: join the multi-host job, if there is one
    (once per program), watch for a failure of its other processes, and mark the start of a
    run's collectives, also the second stage's of a driver that runs several."""
    global _may_be_awaited
    _may_be_awaited = True
    sharding.initialize_distributed()
    cli.watch_other_processes()


@dataclasses.dataclass
class Job:
    """What a training method gives the loop."""

    train_step: Callable  # compiled (state, batch) -> (state, metrics)
    batches: grain.DatasetIterator  # this process's numpy batches; checkpointed with the state
    new_state: Callable[[], TrainState]  # a fresh state, when the workdir has no checkpoint
    abstract_state: TrainState  # shapes and shardings to restore a checkpoint into
    tokens_per_step: int
    learning_rate: optax.Schedule  # the optimizer's schedule, over its updates
    updates_per_step: int = 1  # optimizer updates in one step (online RL: epochs x minibatches)
    flops_per_step: float | None = None  # model FLOPs of one update, for FLOP/s and MFU
    evaluate: Callable[[TrainState], dict] | None = None  # metrics of the held-out set
    finish: Callable[[TrainState], TrainState] | None = None  # before the final checkpoint
    # Text written by the final model (on every process: generation may span hosts), logged
    # with the metrics once the run is finished.
    samples: Callable[[TrainState], str] | None = None


@dataclasses.dataclass
class Result:
    state: TrainState
    last_eval: dict


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into one array sharded over the mesh."""
    sharding_ = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in local.items()}


def run(cfg: ml_collections.ConfigDict, workdir: epath.Path, mesh, job: Job) -> Result:
    """Train for cfg.train.steps updates, resuming from the newest readable checkpoint.

    On SIGTERM the run saves a checkpoint at the step it reached and exits with status 143
    (SystemExit), so that nothing after it (sampling, a driver's next stage) starts while the
    job is being stopped."""
    global _may_be_awaited
    is_primary = jax.process_index() == 0
    steps = cfg.train.steps
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    restored = checkpointer.restore_latest(job.abstract_state, job.batches)
    if restored is None:
        state = job.new_state()
        log.info("starting from scratch in %s", workdir)
    else:
        state, restored_step = restored
        log.info("resumed from the checkpoint at step %d in %s", restored_step, workdir)
    start_step = int(state.step)
    if start_step >= steps:
        log.info("the run in %s is already finished (step %d of %d)", workdir, start_step, steps)

    preemption = _Preemption()
    default_sigterm = signal.signal(signal.SIGTERM, lambda *_: preemption.received.set())
    writer = MetricsWriter(workdir, start_step, enabled=is_primary, wandb_project=cfg.train.wandb_project)
    config_json = json.loads(cfg.to_json())
    if start_step == 0:
        writer.hyperparameters(config_json)
    progress = Progress(steps, start_step) if is_primary else None
    peak = peak_flops_per_device()
    timer = {"step": None, "time": None}
    job.learning_rate(0)  # its first call compiles the schedule's ops (0.6 s): not in a timed interval

    def report(step, metrics):
        """Check one step's metrics and log them every `train.log_every` steps."""
        values = jax.device_get(metrics)
        if not values["finite"]:
            message = (
                f"non-finite loss or gradients at step {step} "
                f"(loss={values['loss']}, grad_norm={values['grad_norm']})"
            )
            if cfg.train.nonfinite == "stop":
                raise NonFiniteError(message + "; the non-finite update was not applied and the run stops")
            log.warning("%s; the non-finite update was skipped (train.nonfinite='skip')", message)
        now = time.perf_counter()
        if timer["step"] is None:  # the first step includes compilation: time from its end
            timer.update(step=step, time=now)
        if step % cfg.train.log_every and step != steps:
            return
        row = {k: v.item() for k, v in values.items() if k not in _UNLOGGED}
        row["lr"] = applied_learning_rate(
            job.learning_rate, step, values["nonfinite_steps"], values["finite"], job.updates_per_step
        )
        if step > timer["step"]:
            step_time = (now - timer["time"]) / (step - timer["step"])
            row.update(step_time=step_time, tokens_per_s=job.tokens_per_step / step_time)
            if job.flops_per_step:
                row["flops_per_s"] = job.flops_per_step / step_time
                if peak:
                    row["mfu"] = row["flops_per_s"] / (peak * jax.device_count())
            if progress:
                progress.update(
                    step, row["loss"], row["tokens_per_s"], row.get("mfu"), row.get("flops_per_s")
                )
        writer.write(step, row)
        timer.update(step=step, time=now)

    profiler = _Profiler(cfg.train.profile_steps, workdir / "tensorboard")

    def evaluate(step):
        result = job.evaluate(state)
        writer.write(step, result)
        if progress:
            progress.evaluation(step, result)
        return result

    last_eval = {}
    try:
        with jax.set_mesh(mesh):
            pending = None  # read a step's metrics only after the next step is dispatched
            for step in range(start_step + 1, steps + 1):
                profiler.before(step)
                state, metrics = job.train_step(state, global_batch(next(job.batches), mesh))
                profiler.after(step, metrics)
                if pending is not None:
                    report(*pending)
                pending = (step, metrics)
                if job.evaluate and step % cfg.eval.every_steps == 0 and step != steps:
                    report(*pending)  # under nonfinite='stop' a failed step raises here
                    pending = None
                    last_eval = evaluate(step)
                    timer.update(step=step, time=time.perf_counter())
                stopping = preemption.after_step()  # after the evaluation: a SIGTERM during it counts
                if step != steps and (step % cfg.checkpoint.every_steps == 0 or stopping):
                    if pending is not None:  # a failed step raises before its state is saved
                        report(*pending)
                        pending = None
                    checkpointer.save(step, state, job.batches, config_json)
                    timer.update(step=step, time=time.perf_counter())  # the save is no step's time
                    stopping = preemption.after_save()
                if stopping:
                    break
            if pending is not None:
                report(*pending)
            if progress:
                progress.close()

            finished = int(state.step) >= steps
            if finished and start_step < steps:
                if job.evaluate:
                    last_eval = evaluate(steps)
                if job.finish:
                    state = job.finish(state)
                checkpointer.save(steps, state, job.batches, config_json)
            elif finished and job.evaluate:
                last_eval = job.evaluate(state)
        stopping = preemption.agreed_now()
        if finished and job.samples and not stopping:
            writer.text("samples", job.samples(state), steps)
    finally:  # also when a step fails: pending saves finish, nothing is left half-written
        profiler.stop()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        workdir_lib.release(workdir)
        signal.signal(signal.SIGTERM, default_sigterm)
    stopping = preemption.agreed_now()  # also during the samples: nothing after the run starts
    _may_be_awaited = False  # that was this run's last collective
    if stopping:
        log.warning("SIGTERM: saved the checkpoint at step %d; the same command resumes", int(state.step))
        raise SystemExit(128 + signal.SIGTERM)
    return Result(state, last_eval)


class _Preemption:
    """SIGTERM, acted on at the same step by every process.

    A save is collective: a process that saves while another runs its next step deadlocks
    both, and a scheduler may signal one host before the others (or one host only). So with
    several processes each step's flags go into an all-reduce, dispatched after the step and
    read after the next one is dispatched, as its metrics are: every process stops one step
    later than the signal, at the same step, without waiting for the devices. A single process
    acts on its own flag at once."""

    def __init__(self):
        self.received = threading.Event()
        self._pending = None  # the all-reduce of the last step's flags, not yet read
        self._agreed = False
        if jax.process_count() > 1:
            by_process = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
            mesh = jax.sharding.Mesh(by_process, ("processes", "local_devices"))
            one_row_each = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))
            self._flags = {  # [process_count] arrays of this process's flag, false or true
                value: jax.make_array_from_single_device_arrays(
                    (jax.process_count(),), one_row_each,
                    [jax.device_put(np.array([value], np.int32), d) for d in jax.local_devices()],
                )
                for value in (False, True)
            }
            self._any = jax.jit(jnp.max, out_shardings=one_row_each.update(spec=jax.sharding.PartitionSpec()))

    def after_step(self) -> bool:
        """Whether to save and stop after the step just dispatched. Every process calls it once
        a step."""
        if jax.process_count() == 1:
            return self.received.is_set()
        previous, self._pending = self._pending, self._any(self._flags[self.received.is_set()])
        self._agreed = self._agreed or (previous is not None and bool(previous.addressable_data(0)))
        return self._agreed

    def after_save(self) -> bool:
        """Whether to stop after the checkpoint just saved: with one process a SIGTERM during
        the save counts; with several, what `after_step` agreed."""
        return self.received.is_set() if jax.process_count() == 1 else self._agreed

    def agreed_now(self) -> bool:
        """Whether any process has received SIGTERM, agreed by waiting for every process: for
        the end of the run, where every process stops anyway."""
        self._agreed = self._agreed or bool(sharding.max_over_processes(self.received.is_set()))
        return self._agreed


class _Profiler:
    """A jax.profiler trace of the steps `first..last` (inclusive), written where TensorBoard's
    profile tab finds it."""

    def __init__(self, steps: tuple, directory: epath.Path):
        self.first, self.last = steps or (0, -1)
        self.directory = directory
        self.tracing = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, metrics) -> None:
        if step == self.last and self.tracing:
            jax.block_until_ready(metrics)  # the traced steps' device work ends inside the trace
            self.stop()
            log.info("profile of steps %d-%d written under %s", self.first, self.last, self.directory)

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
