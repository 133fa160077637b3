"""A run's workdir: a lock that keeps a second run out, and the config check before resuming.

Before anything is written, a run takes `WORKDIR/run.lock` (host and pid of the holder); a
lock whose process is gone (same host, pid not alive) is stale and taken over. A workdir
that already holds a run's `config.json` is resumed only with a config that differs in
settings a resumed run can take (`RESUMABLE`: more steps (never fewer), logging, evaluation,
checkpoint intervals, sampling, the mesh, where the token cache lies and how it is prepared,
the non-finite policy, profiling, W&B, and the attention kernel, remat and loss chunking,
which agree to float32 rounding); any other difference (the model's shape, data, batch,
optimizer, seed) stops the run with the list of differing keys, and the workdir is left as
it was.

A workdir is local or on an object store (`gs://bucket/run`, `s3://...`): every file of a run
is read and written through `etils.epath`.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket

import jax
import ml_collections
from etils import epath

log = logging.getLogger("train")

LOCK_FILE = "run.lock"
_held: set[epath.Path] = set()  # the workdirs this process has locked
# Dotted key prefixes a resumed run may change; everything else shapes the state or the
# trajectory.
RESUMABLE = (
    "train.steps", "train.log_every", "train.nonfinite", "eval.", "checkpoint.", "sample.", "mesh.",
    "train.profile_steps", "train.wandb_project", "data.cache_dir", "data.executor",
    "data.workers", "data.slurm.",
    # Numerics-preserving implementation choices (the kernels agree to float32 rounding).
    "model.attention", "model.remat", "train.loss_chunk",
)


def process_running(pid: int) -> bool:
    """Whether a process of this host with this id runs (a stale lock names one that does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def resolve(path, setting: str = "--workdir") -> epath.Path:
    """`path` as an `epath.Path`: an object-store URI as it is, a local path made absolute. An
    empty one (an unset shell variable, say) is refused rather than read as "."."""
    if not os.fspath(path).strip():
        raise ValueError(f"{setting} is empty: name the run's directory")
    path = epath.Path(path)
    return path if is_remote(path) else path.resolve()


def read_config(workdir) -> dict:
    """The run config in `workdir/config.json`; a file cut short is refused naming it."""
    config_file = epath.Path(workdir) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error}); the run's config is damaged") from None


def is_remote(path) -> bool:
    """Whether `path` lies on an object store (gs://, s3://), not on a local filesystem."""
    return "://" in os.fspath(epath.Path(path))


def prepare(cfg: ml_collections.ConfigDict, workdir) -> epath.Path:
    """Create the workdir, lock it, check a resumed run's config and (on process 0) write the
    run's config. Returns the workdir, absolute if local."""
    workdir = resolve(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where the directory should be
        raise ValueError(f"--workdir={workdir}: {error.strerror or error}") from None
    if jax.process_index() != 0:
        return workdir
    _lock(workdir)
    new = json.loads(cfg.to_json())
    config_file = workdir / "config.json"
    if config_file.exists():
        try:
            changes = differences(read_config(workdir), new)
        except ValueError:
            release(workdir)
            raise
        refused = refused_changes(changes)
        if refused:
            release(workdir)
            listed = "\n".join(f"  {key}: {old!r} -> {value!r}" for key, old, value in refused)
            raise ValueError(
                f"{workdir} holds a run with another config; these keys differ:\n{listed}\n"
                "Start a new run in another --workdir, or, to continue this one with the new "
                f"settings deliberately, delete {config_file}."
            )
        for key, old, value in changes:
            note = " (the learning-rate schedule now spans the new length)" if key == "train.steps" else ""
            log.warning("resuming with %s changed: %r -> %r%s", key, old, value, note)
    partial = workdir / "config.json.partial"  # written whole: a kill leaves the old file or the new
    partial.write_text(json.dumps(new, indent=2))
    partial.replace(config_file)
    return workdir


def refused_changes(changes: list[tuple[str, object, object]]) -> list[tuple[str, object, object]]:
    """The `differences` a resumed run cannot take: keys outside `RESUMABLE`, and fewer steps
    (the run would end before the checkpoint it resumes from)."""
    return [c for c in changes if not c[0].startswith(RESUMABLE) or (c[0] == "train.steps" and c[2] < c[1])]


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every leaf that differs, missing ones as None."""
    flat_old, flat_new = flatten(old), flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [(k, flat_old.get(k), flat_new.get(k)) for k in keys if flat_old.get(k) != flat_new.get(k)]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _lock(workdir: epath.Path) -> None:
    path = workdir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while not _create(path, json.dumps(me)):
        try:
            holder = json.loads(path.read_text())
        except json.JSONDecodeError:  # empty or cut short: a run killed while taking it
            raise RuntimeError(
                f"{path} names no process (a run killed while taking the lock?); if no run is "
                "active in this workdir, delete that file"
            ) from None
        if holder == me:
            return
        if holder.get("host") == me["host"] and not process_running(holder.get("pid", -1)):
            log.warning("taking over the stale lock of process %s (no longer running)", holder.get("pid"))
            _remove_if_unchanged(path, holder)
            continue
        raise RuntimeError(
            f"{workdir} is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"({path}); if no run is active there, delete that file"
        )
    _held.add(workdir)


def _remove_if_unchanged(path: epath.Path, holder: dict) -> None:
    """Delete the lock file if it still names `holder`. Two runs taking over one stale lock
    would otherwise both start: the second to read it deleting the lock the first had just
    taken. Locally the read and the delete happen under an exclusive `flock` of the workdir;
    an object store has no such lock."""
    if is_remote(path):
        path.unlink(missing_ok=True)
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # gone, or being written by a new holder
            return
        if current == holder:
            path.unlink()
    finally:
        os.close(directory)  # and with it the flock


def _create(path: epath.Path, text: str) -> bool:
    """Write `text` to a new file; False if the file exists. Atomic on a local filesystem; an
    object store has no exclusive create, so there it is a check, a write and a read-back (two
    runs started in the same instant may both pass)."""
    if is_remote(path):
        if path.exists():
            return False
        path.write_text(text)
        return path.read_text() == text
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def release(workdir: epath.Path) -> None:
    """Give up this process's lock on the workdir (a no-op if another process holds it)."""
    _held.discard(workdir)
    path = epath.Path(workdir) / LOCK_FILE
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if holder == {"host": socket.gethostname(), "pid": os.getpid()}:
        path.unlink(missing_ok=True)


def release_held() -> None:
    """Give up every lock this process holds: at exit, and before `os._exit` (`train.cli`),
    which skips the exit handlers."""
    for workdir in list(_held):
        release(workdir)


atexit.register(release_held)
