"""Checkpoints restore state and data-iterator position; corrupt ones are skipped."""

import logging
import pathlib
import subprocess
import sys

import grain
import pytest
import jax.numpy as jnp
import numpy as np

from data.packing import Batches, DataChanged
from train.checkpoint import Checkpointer


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def _save_three(directory):
    checkpointer = Checkpointer(directory, keep=3)
    it = _iterator()
    for step in (1, 2, 3):
        for _ in range(4):
            next(it)
        state = {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}
        checkpointer.save(step, state, it, {"note": "test"})
    checkpointer.wait()
    checkpointer.close()
    return it


def test_restore_latest_returns_state_and_iterator_position(tmp_path):
    it = _save_three(tmp_path)
    upcoming = [next(it) for _ in range(5)]
    abstract = {"w": jnp.zeros((3,)), "step": jnp.asarray(0)}
    fresh = _iterator()
    state, step = Checkpointer(tmp_path, keep=3).restore_latest(abstract, fresh)
    assert step == 3
    np.testing.assert_array_equal(state["w"], [3.0, 3.0, 3.0])
    assert [next(fresh) for _ in range(5)] == upcoming


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    _save_three(tmp_path)
    for path in (tmp_path / "3" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    abstract = {"w": jnp.zeros((3,)), "step": jnp.asarray(0)}
    with caplog.at_level(logging.WARNING):
        state, step = Checkpointer(tmp_path, keep=3).restore_latest(abstract, _iterator())
    assert step == 2
    np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
    assert "cannot be restored" in caplog.text and "/3" in caplog.text


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(tmp_path, keep=3).restore_latest({"w": jnp.zeros(3)}, _iterator()) is None


def test_a_corrupt_checkpoint_passed_over_is_replaced_when_its_step_comes_again(tmp_path):
    _save_three(tmp_path)
    for path in (tmp_path / "3" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    checkpointer = Checkpointer(tmp_path, keep=3)
    it = _iterator()
    _, step = checkpointer.restore_latest({"w": jnp.zeros((3,)), "step": jnp.asarray(0)}, it)
    assert step == 2
    checkpointer.save(3, {"w": jnp.full((3,), 30.0), "step": jnp.asarray(3)}, it, {"note": "again"})
    checkpointer.wait()
    checkpointer.close()
    state, step = Checkpointer(tmp_path, keep=3).restore_latest({"w": jnp.zeros((3,)), "step": jnp.asarray(0)}, _iterator())
    assert step == 3
    np.testing.assert_array_equal(state["w"], [30.0, 30.0, 30.0])


_RESTORE_PAST_A_TRUNCATED_MANIFEST = """
import logging, pathlib, sys
import grain, jax.numpy as jnp
from data.packing import Batches, DataChanged
from train.checkpoint import Checkpointer

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", force=True)
directory = pathlib.Path(sys.argv[1])
tree = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(80)}
checkpointer = Checkpointer(directory, keep=3)
for step in (1, 2):
    checkpointer.save(step, tree, iter(grain.MapDataset.range(9).to_iter_dataset()), {})
checkpointer.wait()
checkpointer.close()
manifest = directory / "2" / "state" / "manifest.ocdbt"
manifest.write_bytes(manifest.read_bytes()[:40])
_, step = Checkpointer(directory, keep=3).restore_latest(
    tree, iter(grain.MapDataset.range(9).to_iter_dataset())
)
print("restored", step)
"""


def test_a_truncated_checkpoint_gives_one_warning_line(tmp_path):
    # Orbax abandons the other reads of a checkpoint whose manifest is cut short; each used
    # to print an "Event loop is closed" traceback, and the warning carried tensorstore's spec.
    completed = subprocess.run(
        [sys.executable, "-c", _RESTORE_PAST_A_TRUNCATED_MANIFEST, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=pathlib.Path(__file__).parents[2],
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "restored 1\n"
    lines = completed.stderr.splitlines()
    warning = f"WARNING checkpoint {tmp_path}/2 cannot be restored (ValueError: DATA_LOSS"
    assert lines[0].startswith(warning), lines[0]
    assert "manifest.ocdbt" in lines[0] and "tensorstore_spec" not in lines[0]
    assert len(lines) == 1, completed.stderr


def test_a_run_whose_checkpoints_all_fail_to_restore_stops_and_keeps_them(tmp_path):
    _save_three(tmp_path)
    other_shape = {"w": jnp.zeros((4,)), "step": jnp.asarray(0)}
    with pytest.raises(ValueError, match=r"none of the checkpoints \[1, 2, 3\] can be restored .* nothing was changed"):
        Checkpointer(tmp_path, keep=3).restore_latest(other_shape, _iterator())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2", "3"]


def test_a_checkpoint_of_other_data_stops_the_run_naming_both_digests(tmp_path):
    """Every checkpoint of the run was saved on the other cache: none is skipped, none deleted."""
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        checkpointer.save(step, {"w": jnp.zeros((3,))}, Batches(_iterator(), "a" * 64), {"note": "test"})
    checkpointer.wait()
    checkpointer.close()
    with pytest.raises(DataChanged, match=f"digest {'a' * 64}, but this run reads one with digest {'b' * 64}"):
        Checkpointer(tmp_path, keep=3).restore_latest({"w": jnp.zeros((3,))}, Batches(_iterator(), "b" * 64))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2"]
