"""A workdir on an object store (gs://bucket/run), offline: gs:// is served by an in-memory
fsspec filesystem that takes gcsfs's place under etils.epath.

Orbax writes arrays through TensorStore's own GCS driver, which this fake does not reach: the
runs here keep their checkpoints in a local directory and check that orbax is handed the
gs:// path as it is; everything else of a run is read from the fake bucket.
"""

import atexit
import json
import os
import socket

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils

from align import source
from data import pipeline
from model import export, sharding
from tests.train.test_metrics import _events
from tests.train.tiny_experiment import tiny_config, write_tiny_corpus
from train import checkpoint, evaluate, loop, pretrain, workdir
from train import config as config_lib
from train.metrics import read_metrics

RUN = "gs://bucket/run"


class FakeBucket(MemoryFileSystem):
    """gs:// in memory, with gcsfs's form of a path ('bucket/key')."""

    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        return fsspec.utils.stringify_path(path).removeprefix("gs://").removeprefix("gcs://").strip("/")


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs:// in memory for one test, run in tmp_path, where no `gs:` folder (a URI taken for a
    local path) may appear."""
    monkeypatch.setattr(FakeBucket, "store", {})
    monkeypatch.setattr(FakeBucket, "pseudo_dirs", [""])
    monkeypatch.setitem(fsspec_registry, "gcs", FakeBucket)
    # Orbax asks the bucket's metadata service whether it has a hierarchical namespace.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)
    yield
    backend.fsspec_backend._get_filesystem.cache_clear()
    atexit.unregister(workdir.release)  # at exit, a release would reach for the real gs://
    assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())


@pytest.fixture
def local_checkpoints(monkeypatch, tmp_path):
    """Checkpoints in tmp_path/checkpoints; returns the directories orbax was asked for."""
    asked = []

    def checkpointer(directory, **kwargs):
        asked.append(directory)
        directory.mkdir(parents=True, exist_ok=True)  # as orbax does
        return checkpoint.Checkpointer(tmp_path / "checkpoints", **kwargs)

    monkeypatch.setattr(loop, "Checkpointer", checkpointer)
    monkeypatch.setattr(source, "Checkpointer", checkpointer)
    return asked


def _config(tmp_path, steps):
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "cache", steps=steps)
    cfg.optimizer.warmup_steps = 1
    return cfg


def test_a_pretraining_run_writes_its_workdir_to_the_bucket_and_resumes_there(bucket, local_checkpoints, tmp_path):
    (tmp_path / "corpus").mkdir()
    write_tiny_corpus(tmp_path / "corpus")
    run = epath.Path(RUN)
    pretrain.run(_config(tmp_path, steps=4), RUN)
    assert [str(d) for d in local_checkpoints] == [f"{RUN}/checkpoints"]
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "data_report.json", "tokenizer.model", "metrics.jsonl", "loss_curve.png", "samples.txt", "tensorboard"} <= names
    assert workdir.LOCK_FILE not in names  # released at the end
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert (run / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "--- greedy | prompt 'import '" in (run / "samples.txt").read_text()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]

    pretrain.run(_config(tmp_path, steps=6), RUN)  # more steps: a resume
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    losses = {e.step for e in _events(run / "tensorboard") for v in e.summary.value if v.tag == "loss"}
    assert losses == {1, 2, 3, 4, 5, 6}
    samples = [v for e in _events(run / "tensorboard") for v in e.summary.value if v.tag == "samples/text_summary"]
    assert len(samples) == 2

    # What evaluation, post-training and export read from a workdir.
    result = evaluate.evaluate(RUN, ["import os\n", "x = [1, 2]\n"], batch_size=8)
    assert result["documents"] == 2 and np.isfinite(result["loss"])
    start = source.from_workdir(RUN)
    assert start.tokenizer.model_proto == (run / "tokenizer.model").read_bytes()
    params = start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config))
    assert {str(d) for d in local_checkpoints} == {f"{RUN}/checkpoints"}
    export.to_hf(start.model_config, params, tmp_path / "hf", run / "tokenizer.model")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == start.tokenizer.model_proto


def test_orbax_gets_the_checkpoint_directory_as_a_gs_path(bucket):
    checkpointer = checkpoint.Checkpointer(workdir.resolve(RUN) / "checkpoints", keep=2)
    assert str(checkpointer._manager.directory) == f"{RUN}/checkpoints"
    assert checkpointer.restore_latest({"w": np.zeros(3)}, None) is None
    checkpointer.close()
    assert epath.Path(RUN, "checkpoints").is_dir()


def test_the_lock_works_on_the_bucket(bucket):
    run = workdir.prepare(config_lib.base_config(), RUN)
    assert str(run) == RUN
    lock = run / workdir.LOCK_FILE
    assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    lock.write_text(json.dumps({"host": "another-host", "pid": 1}))
    with pytest.raises(RuntimeError, match="is in use by process 1 on another-host"):
        workdir.prepare(config_lib.base_config(), RUN)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1}))  # no such process
    workdir.prepare(config_lib.base_config(), RUN)  # a stale lock is taken over
    workdir.release(RUN)
    assert not lock.exists()


def test_a_data_cache_on_an_object_store_is_refused():
    cfg = pipeline.default_config()
    cfg.cache_dir = "gs://bucket/cache"
    with pytest.raises(ValueError, match="memory-mapped, so it must be a local"):
        pipeline.open_corpus(cfg)
