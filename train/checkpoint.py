"""Checkpoints: train state + data-iterator state + config, saved together with orbax."""

from __future__ import annotations

import inspect
import logging
import sys

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from data.packing import DataChanged
from model import sharding

log = logging.getLogger(__name__)


def _is_abandoned_read(unraisable) -> bool:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    # A read coroutine of orbax's that failed after the restore had already given up.
    coroutine = unraisable.object
    return inspect.iscoroutine(coroutine) and "orbax" in coroutine.cr_code.co_filename


def _silence_abandoned_reads() -> None:
    """When one array of a checkpoint fails to read, orbax gives up and closes its event loop
    while tensorstore goes on reading the others; each of those reads then prints an 'Event
    loop is closed' traceback (or, its coroutine abandoned, an 'Exception ignored in')
    and asyncio logs its unretrieved error, dozens per checkpoint.
    The warning of `restore_latest` already says what failed."""
    previous_hook = sys.unraisablehook
    if getattr(previous_hook, "silences_abandoned_reads", False):
        return

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous_hook(unraisable)

    hook.silences_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage()
    )


def _reason(error: Exception) -> str:
    """The first line of a restore error, without tensorstore's spec dump."""
    message = str(error).splitlines()[0] if str(error) else ""
    for noise in (" [tensorstore_spec", " See full TensorStore details"):
        message = message.split(noise)[0]
    return f"{type(error).__name__}: {message}"


# What restoring one checkpoint came to on one process, worst last.
_RESTORED, _UNREADABLE, _DATA_CHANGED = range(3)


def _join_restore_barrier() -> None:
    """orbax's restore ends at a barrier of every process (`Checkpointer.restore`), which a
    process whose restore raised did not reach: it joins it here, or the processes that did
    restore would pair that barrier with this process's next collective."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes("_Checkpointer:restore")


class Checkpointer:
    """Asynchronous saves every K steps, keeping the last N; restores the newest readable
    checkpoint, skipping incomplete or corrupt ones with a warning."""

    def __init__(self, directory, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, state, data_iterator, config: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) of the newest checkpoint that restores, or None if there is none.
        `data_iterator` is restored in place. Unreadable checkpoints newer than the one
        restored are deleted, so that the run can save those steps again; if none restores
        (a state of another shape), nothing is deleted and the run stops. With several
        processes a checkpoint counts as restored only if it restored on every process, so
        that all resume from the same step."""
        _silence_abandoned_reads()
        unreadable = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            self._require_process_count(step)
            data_changed = None
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
                outcome = _RESTORED
            except DataChanged as error:  # readable, but of other data: no older checkpoint is better
                data_changed, outcome = error, _DATA_CHANGED
                _join_restore_barrier()
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning(
                    "checkpoint %s/%d cannot be restored (%s); trying the previous one",
                    self.directory, step, _reason(error),
                )
                outcome = _UNREADABLE
                _join_restore_barrier()
            worst = sharding.max_over_processes(outcome)
            if worst == _DATA_CHANGED:
                raise data_changed or DataChanged(
                    f"{self.directory}/{step}: another process found its data changed (see its error)"
                )
            if worst == _UNREADABLE:
                if outcome == _RESTORED:
                    log.warning(
                        "checkpoint %s/%d restored here but not on another process; trying the previous one",
                        self.directory, step,
                    )
                unreadable.append(step)
                continue
            for bad in unreadable:
                self._manager.delete(bad)
            return restored.state, step
        if unreadable:  # starting afresh would let keep-N delete a run this code cannot read
            raise ValueError(
                f"{self.directory}: none of the checkpoints {sorted(unreadable)} can be restored "
                "(see the warnings above); nothing was changed. Start the run in another workdir, or "
                "delete the checkpoints to start over there"
            )
        return None

    def _require_process_count(self, step: int) -> None:
        """The data iterators' positions are saved one per process (`process_I-of-N.json`): a
        checkpoint resumes only with the process count that wrote it."""
        written = [p.name for p in (epath.Path(self.directory) / str(step) / "data").glob("process_*-of-*.json")]
        count = int(written[0].split("-of-")[1].removesuffix(".json")) if written else jax.process_count()
        if count != jax.process_count():
            raise ValueError(
                f"{self.directory}/{step} was written by {count} processes and this run has "
                f"{jax.process_count()}: each process's place in the data is saved apart, so the run "
                f"resumes only with {count} processes; nothing was changed"
            )

    def restore_state(self, abstract_state):
        """(state, step) of the newest checkpoint, the state alone (no data iterator): how
        another run starts from this one."""
        steps = self._manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to start from")
        step = max(steps)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
