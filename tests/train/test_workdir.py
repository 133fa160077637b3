"""The workdir: one run at a time, and a resumed run's config checked before anything is written."""

import json
import logging
import socket
import subprocess
import sys

import pytest

from train import config as config_lib
from train import workdir


def _config(**train):
    cfg = config_lib.base_config()
    cfg.train.update(train)
    return cfg


def test_a_changed_model_stops_the_run_listing_the_keys_and_writes_nothing(tmp_path):
    workdir.prepare(_config(), tmp_path)
    workdir.release(tmp_path)
    before = (tmp_path / "config.json").read_text()
    changed = _config(seed=7)
    changed.model.d_model = 48
    with pytest.raises(ValueError, match=r"(?s)these keys differ:\n  model.d_model: 256 -> 48\n  train.seed: 0 -> 7\n.*another --workdir"):
        workdir.prepare(changed, tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_more_steps_and_other_intervals_are_allowed_and_logged(tmp_path, caplog):
    workdir.prepare(_config(steps=100), tmp_path)
    workdir.release(tmp_path)
    longer = _config(steps=300, log_every=5)
    with caplog.at_level(logging.WARNING, logger="train"):
        workdir.prepare(longer, tmp_path)
    workdir.release(tmp_path)
    assert "train.steps changed: 100 -> 300 (the learning-rate schedule now spans the new length)" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 300


def test_an_empty_workdir_a_file_in_its_place_and_a_damaged_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^--workdir is empty"):  # an unset $RUN, say: not "."
        workdir.prepare(_config(), "")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"--workdir=.*a_file: File exists"):
        workdir.prepare(_config(), tmp_path / "a_file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"train": {"st')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        workdir.prepare(_config(), tmp_path / "run")
    assert not (tmp_path / "run" / workdir.LOCK_FILE).exists()


@pytest.mark.parametrize("content", ["", '{"host": "h'])
def test_a_lock_cut_short_is_refused_in_one_line(tmp_path, content):
    (tmp_path / workdir.LOCK_FILE).write_text(content)
    with pytest.raises(RuntimeError, match=r"run.lock names no process .*delete that file"):
        workdir.prepare(_config(), tmp_path)


def test_fewer_steps_are_refused_and_the_config_kept(tmp_path):
    """A run resumed with fewer steps would end before the checkpoint it resumes from."""
    workdir.prepare(_config(steps=100), tmp_path)
    workdir.release(tmp_path)
    with pytest.raises(ValueError, match=r"these keys differ:\n  train.steps: 100 -> 80\n"):
        workdir.prepare(_config(steps=80), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 100


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(RuntimeError, match=rf"is in use by process {holder.pid} on {socket.gethostname()}"):
            workdir.prepare(_config(), tmp_path)
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    workdir.prepare(_config(), tmp_path)  # the holder is gone: its lock is stale and taken over
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] != holder.pid
    workdir.release(tmp_path)
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_a_stale_lock_taken_over_by_another_run_meanwhile_is_left_to_it(tmp_path):
    """Two runs that both read the same stale lock: the one that deletes it second finds the
    first one's new lock there and leaves it."""
    stale = {"host": socket.gethostname(), "pid": _dead_pid()}
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(stale))
    workdir.prepare(_config(), tmp_path)  # this process takes the stale lock over
    mine = (tmp_path / workdir.LOCK_FILE).read_text()
    workdir._remove_if_unchanged(tmp_path / workdir.LOCK_FILE, stale)  # the later run's step
    assert (tmp_path / workdir.LOCK_FILE).read_text() == mine
    workdir._remove_if_unchanged(tmp_path / workdir.LOCK_FILE, json.loads(mine))
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)
