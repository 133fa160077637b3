"""The preparation engine: the same bytes however the tasks run (workers, hosts, Ray), and a
killed preparation resumed by running only its unfinished tasks."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data import pipeline, prepare
from data.steps import Layout
from tests.data import corpora

ROOT = pathlib.Path(__file__).resolve().parents[2]

_PREPARE = textwrap.dedent(
    """
    import json, sys, time
    import ml_collections
    from data import prepare, steps

    cfg, host_index, host_count, stall_from = json.loads(sys.argv[1]), *map(int, sys.argv[2:])
    if stall_from >= 0:  # tokenize tasks from this rank on stall once their shards are written
        tokenize = steps.TokenizeShards.run

        def stalled(self, data, rank=0, world_size=1):
            tokenize(self, data, rank, world_size)
            if rank >= stall_from:
                time.sleep(120)

        steps.TokenizeShards.run = stalled
    prepare.run(ml_collections.ConfigDict(cfg), host_index, host_count)
    """
)


def _launch(cfg, host_index=0, host_count=1, stall_from=-1) -> subprocess.Popen:
    """`prepare.run` in a new process (the local executor's workers fork; this one runs JAX),
    leading its own process group, which holds the workers too."""
    arguments = [json.dumps(cfg.to_dict()), str(host_index), str(host_count), str(stall_from)]
    return subprocess.Popen(
        [sys.executable, "-c", _PREPARE, *arguments], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output


def _config(prepared, cache_dir, **overrides):
    cfg = prepared.config.copy_and_resolve_references()
    cfg.cache_dir = str(cache_dir)
    cfg.update(overrides)
    return cfg


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    """The prepared corpus: tokenizer and shard files."""
    paths = [directory / "tokenizer.model", *sorted((directory / "shards").iterdir())]
    return {p.name: p.read_bytes() for p in paths}


def _assert_same_corpus(corpus, reference) -> None:
    assert corpus.directory.name == reference.directory.name
    assert corpus.digest == reference.digest and corpus.report == reference.report
    assert _files(corpus.directory) == _files(reference.directory)


def test_two_workers_write_the_same_bytes_as_one(prepared, tmp_path):
    cfg = _config(prepared, tmp_path / "cache", workers=2)
    _finish(_launch(cfg))
    _assert_same_corpus(pipeline.open_corpus(cfg), prepared)


def test_two_hosts_splitting_the_tasks_write_the_same_bytes_as_one(prepared, tmp_path):
    cfg = _config(prepared, tmp_path / "cache")
    hosts = [_launch(cfg, host_index=i, host_count=2) for i in range(2)]
    for host in hosts:
        _finish(host)
    _assert_same_corpus(pipeline.open_corpus(cfg), prepared)


def test_rerun_after_sigkill_during_tokenization_runs_only_unfinished_tasks(prepared, tmp_path):
    cfg = _config(prepared, tmp_path / "cache")
    process = _launch(cfg, stall_from=3)
    layout = Layout(pipeline.cache_directory(cfg))
    tokenize = layout.stage("tokenize")
    deadline = time.time() + 120
    while not (layout.shards / "train-00003.tokens").exists():
        assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() is not None else "timed out"
        time.sleep(0.05)
    # The whole group, as a scheduler or `kill -9 -PGID` does: a worker blocked on its dead
    # driver's task queue would never exit.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in (tokenize / "completions").iterdir())
    assert done == ["00000", "00001", "00002"] and not layout.manifest.exists()
    # Files of finished tasks, here and in the earlier stages, must not be written again.
    finished = [*(tokenize / "completions").iterdir(), *(tokenize / "logs").glob("task_0000[012].log"),
                *layout.shards.glob("*-0000[012].*"), *layout.stage("clean").rglob("*"), *layout.stage("tokenizer").rglob("*")]
    written = {p: os.stat(p).st_mtime_ns for p in finished if p.is_file()}

    _finish(_launch(cfg))
    assert {p: os.stat(p).st_mtime_ns for p in written} == written
    assert sorted(p.name for p in (tokenize / "completions").iterdir()) == [f"{i:05d}" for i in range(8)]
    assert not list(layout.directory.rglob("*.partial"))
    _assert_same_corpus(pipeline.open_corpus(cfg), prepared)


@pytest.mark.ray
def test_ray_on_a_two_raylet_cluster_writes_the_same_bytes_as_local(prepared, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from data import prepare

    # Ray starts an actor per task: the 50 tasks of the test corpus's stages at 8 tasks took
    # 107 s here; 2 tasks and no MinHash stages (whose bucket stage alone has 14) take 30 s.
    local = prepare.run(_config(prepared, tmp_path / "local", tasks=2, dedup={"near": False}))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1}, connect=False)
    cluster.add_node(num_cpus=1)
    ray.init(
        address=cluster.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        corpus = prepare.run(_config(prepared, tmp_path / "ray", tasks=2, dedup={"near": False}, executor="ray"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    _assert_same_corpus(corpus, local)


def test_preparing_in_a_subprocess_reads_relative_paths_from_the_callers_directory(text_corpus, tmp_path, monkeypatch):
    """A run that finds no corpus prepares it in a new process (`run_in_subprocess`); its
    relative data paths and cache directory mean there what they mean to the caller."""
    directory, texts = text_corpus
    shutil.copytree(directory, tmp_path / "mycorpus")
    monkeypatch.chdir(tmp_path)
    cfg = corpora.small_config(pathlib.Path("mycorpus"), pathlib.Path("cache"))
    prepare.run_in_subprocess(cfg)
    corpus = pipeline.open_corpus(cfg)
    assert corpus.directory.resolve().parent == tmp_path / "cache"
    assert corpus.report["documents_in"] == len(texts)
