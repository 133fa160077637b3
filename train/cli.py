"""The command line of every training entry point, and how it reports a refused input.

`--config=FILE[:variant]` with `--config.x.y=v` overrides, and `--workdir`. An error this
project raises about its input (a bad config value, a missing file, a workdir in use, a
non-finite loss under `train.nonfinite=stop`) ends the program with one line, `error: ...`, and
exit status 1; an exception raised anywhere else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import pathlib
import signal
import sys
import threading
import time
import traceback
from typing import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_PROJECT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGES = tuple(_PROJECT / name for name in ("align", "data", "experiments", "model", "train"))
_REPORTED = (ValueError, KeyError, OSError, RuntimeError)


def _raised_by_this_project(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is in this project's code: a
    `raise` of ours that names the input, rather than a failure inside a library."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    path = pathlib.Path(traceback.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(package) for package in _PACKAGES)


def _message(error: BaseException) -> str:
    # str(KeyError) is the repr of its argument: quotes and escaped newlines.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return str(text)


def exit_on_input_error(function: Callable[[], object]) -> object:
    """Call `function`; an input error of ours ends the program with its message alone. A
    process of a multi-process job that fails while the others may wait for it exits at once
    (`_exit_now`)."""
    try:
        return function()
    except BaseException as error:
        reported = isinstance(error, _REPORTED) and _raised_by_this_project(error)
        ending = SystemExit(f"error: {_message(error)}") if reported else error
        stopped_together = isinstance(ending, SystemExit) and ending.code in (None, 0, 128 + signal.SIGTERM)
        if _awaited_by_other_processes() and not stopped_together:
            _exit_now(ending)
        if reported:
            raise ending from None
        raise


def _awaited_by_other_processes() -> bool:
    """Whether other processes of a multi-process job may wait for this one in a collective: not
    after a run's loop has passed its last one (`train.loop.may_be_awaited`), when the others
    have finished and jax's shutdown barrier lets every process exit cleanly."""
    jax, loop = sys.modules.get("jax"), sys.modules.get("train.loop")
    in_a_job = jax is not None and jax.distributed.is_initialized()
    return in_a_job and (loop is None or loop.may_be_awaited())


def _exit_now(error: BaseException, announce: bool = True) -> None:
    """Report the error and end this process without jax's shutdown barrier, where it would wait
    5 minutes for the other processes while they wait for it in their next collective. The
    error is announced to them (`watch_other_processes`), so they end at once too; `announce`
    is False for the error of another process. Nothing is printed after the error, and only
    the first caller reports: a second thread that gets here waits for the process's end."""
    if not _exiting.acquire(blocking=False):
        threading.Event().wait()
    sys.stdout.flush()  # what was printed before the error comes before it
    if isinstance(error, SystemExit):
        print(error.code, file=sys.stderr)
    else:
        traceback.print_exception(error)
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (1, 2):  # the main thread's step lines, jax's log of the job's end
        os.dup2(devnull, stream)
    from train import workdir as workdir_lib  # imported by every program that gets here

    workdir_lib.release_held()  # os._exit runs no exit handlers
    if announce:
        _announce_failure(_summary(error))
    _leave_the_job()
    os._exit(1)


def _summary(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return error.code.removeprefix("error: ") if isinstance(error.code, str) else f"exit status {error.code}"
    return ": ".join(filter(None, [type(error).__name__, _message(error)]))


_exiting = threading.Lock()  # held by the thread in `_exit_now`
_watching = False


def watch_other_processes() -> None:
    """In a multi-process job, end this process with the error of another that failed while it
    may wait for it (`_exit_now`). Without it, a process waiting in a collective for one that is
    gone is held until the coordinator misses that one's heartbeats (100 s), then aborts with a
    core dump and not a word of why. Started once per program, by `train.loop.begin_run`.

    Each process waits on a key of its own in the job's key-value store (jax's coordination
    service): a failing process writes its error there, and at a normal exit the process
    writes an empty value itself, so the waiting thread returns before jax shuts the client
    down (a thread still inside the client's call then aborts the process)."""
    global _watching
    jax = sys.modules["jax"]
    if _watching or not jax.distributed.is_initialized():
        return
    _watching = True
    client, key = _job_client(), _failure_key(jax.process_index())

    def watch():
        while True:
            try:
                error = client.blocking_key_value_get(key, 600_000)
            except Exception as timeout:  # noqa: BLE001 - jax raises its runtime error
                if "DEADLINE_EXCEEDED" in str(timeout):
                    continue
                return  # the coordinator is gone: jax reports that itself
            if error:
                _exit_now(SystemExit(f"error: {error}"), announce=False)
            return

    watcher = threading.Thread(target=watch, name="watch_other_processes", daemon=True)
    watcher.start()

    def stop_watching():  # registered after jax's clean-up (at its import), so run before it
        _try_to_set(client, key, "")
        _try_to_set(client, _left_key(jax.process_index()), "")
        watcher.join(timeout=10)

    atexit.register(stop_watching)


def _announce_failure(error: str) -> None:
    """Leave `error` for every other process, process 0's last: the others are told first, and
    process 0, whose end ends the coordination service, then waits for them to leave
    (`_leave_the_job`)."""
    jax = sys.modules["jax"]
    client = _job_client()
    for process in reversed(range(jax.process_count())):
        if process != jax.process_index():
            _try_to_set(client, _failure_key(process), f"process {jax.process_index()} failed: {error}")


def _leave_the_job() -> None:
    """Say that this process is leaving. The process that runs jax's coordination service
    (process 0) first waits, 10 s at most, until every other one has said so, and a second
    more for them to exit: the service ends with it, and a process still in the job then ends
    with jax's "detected fatal errors" and a core dump instead."""
    jax = sys.modules["jax"]
    client = _job_client()
    _try_to_set(client, _left_key(jax.process_index()), "")
    if not _runs_the_coordination_service():
        return
    deadline = time.monotonic() + 10
    for process in range(1, jax.process_count()):
        milliseconds_left = max(1, int(1000 * (deadline - time.monotonic())))
        try:
            client.blocking_key_value_get(_left_key(process), milliseconds_left)
        except Exception:  # noqa: BLE001 - jax raises its runtime error
            return
    time.sleep(1)


def _try_to_set(client, key: str, value: str) -> None:
    """Set `key`, unless another process's error (or its own exit) set it first, or the
    coordinator is gone: the process that tries is on its way out either way."""
    try:
        client.key_value_set(key, value)
    except Exception:  # noqa: BLE001 - jax raises its runtime error
        pass


def _failure_key(process: int) -> str:
    return f"lmx/failure_of_another_process/{process}"


def _left_key(process: int) -> str:
    return f"lmx/left_the_job/{process}"


def _job_client():
    """The client of the job's coordination service, which orbax's multi-host barriers use too."""
    from jax._src import distributed

    return distributed.global_state.client


def _runs_the_coordination_service() -> bool:
    from jax._src import distributed

    return distributed.global_state.service is not None


def _config_error(error: BaseException, argv: list[str]) -> str:
    """One line for a config file or override that ml_collections could not apply."""
    for cause in (error, error.__context__):
        if isinstance(cause, KeyError):
            quoted_key, *suggestion = _message(cause).split("\n", 1)
            key = quoted_key.strip("'")
            override = next(
                (arg for arg in argv if key in arg.split("=", 1)[0].split(".")[1:]), "an override"
            )
            return " ".join([f"{override}: no config key {quoted_key}.", *suggestion])
    if "Failed loading config file" in str(error):
        config_file = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), "")
        return f"--config={config_file}: {str(error).splitlines()[-1].strip()}"
    return f"{type(error).__name__}: {_message(error)}"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        if not isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
            flags.FLAGS.config.to_dict()  # ml_collections' stand-in for a config file that failed to load raises
        return remaining
    except flags.Error as error:  # a value of the wrong type, a missing flag, get_config raised
        text = str(error)
        if "Error whilst parsing config file" in text:  # absl keeps get_config's traceback as text
            text = f"{text.split(': Error whilst')[0]}: {text.strip().splitlines()[-1]}"
        sys.exit(f"error: {text}")
    except Exception as error:  # noqa: BLE001 - whatever loading the config file raised
        sys.exit(f"error: {_config_error(error, argv)}")


def given_flags(*names: str) -> list[str]:
    """Those of the flags `names` given on the command line, as `--name`."""
    return [f"--{name}" for name in names if flags.FLAGS[name].present]


def configure_logging() -> None:
    """This project's INFO lines with their time; libraries' only from WARNING up (set
    `logging.getLogger(name).setLevel(logging.INFO)` in a driver to see theirs)."""
    logging.basicConfig()  # a no-op under absl.app, whose handler already serves the root logger
    logging.root.setLevel(logging.INFO)
    for handler in logging.root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for library in ("absl", "jax"):  # orbax's per-save lines, jax's backend probing
        logging.getLogger(library).setLevel(logging.WARNING)


def run_program(main: Callable[[list[str]], object]) -> None:
    """absl's `app.run` for a program with flags of its own: logging as `configure_logging`
    sets it, and an input error of ours in one line."""

    def start(argv):
        configure_logging()
        exit_on_input_error(lambda: main(argv))

    app.run(start)


def main(run: Callable[[ml_collections.ConfigDict, str], object]) -> None:
    """Parse the command line and call `run(config, workdir)`. Flags are defined here, when a
    program runs, not at import, so that drivers can import `run` beside flags of their own."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    flags.mark_flags_as_required(["config", "workdir"])

    def start(argv):
        del argv
        configure_logging()
        exit_on_input_error(lambda: run(flags.FLAGS.config, flags.FLAGS.workdir))

    app.run(start, flags_parser=_parse_flags)
