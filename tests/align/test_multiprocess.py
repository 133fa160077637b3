"""Post-training on two JAX processes (4 fake CPU devices each) against one process fed the
global batches they assemble (process 0's rows, then process 1's): the losses agree to float32
rounding."""

import textwrap

import grain
import numpy as np

from align import data as align_data
from align import train as align_train
from tests.align.test_train import align_cfg, data_dir, pretrained  # noqa: F401 - fixtures
from tests.train.test_multiprocess import launch_two, outputs_of
from train.metrics import read_metrics


class _BothShards(grain.DatasetIterator):
    """The global batches of a two-process run, in one process: shard 0's rows, then shard 1's."""

    def __init__(self, shards):
        super().__init__()
        self.shards = shards

    def __next__(self):
        parts = [next(shard) for shard in self.shards]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self):
        return {"shards": [shard.get_state() for shard in self.shards]}

    def set_state(self, state):
        for shard, shard_state in zip(self.shards, state["shards"]):
            shard.set_state(shard_state)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


def test_dpo_on_two_processes_follows_one_process_fed_the_same_batches(pretrained, data_dir, tmp_path, monkeypatch):  # noqa: F811
    cfg = align_cfg("dpo", pretrained, data_dir, train=dict(steps=6), checkpoint=dict(every_steps=3))
    config_file = tmp_path / "experiment.py"
    config_file.write_text(textwrap.dedent(f"""
        import json
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
    """))
    processes = launch_two(config_file, tmp_path / "two", program="align.train")
    outputs = outputs_of(processes)
    assert [p.returncode for p in processes] == [0, 0], outputs

    one_shard = align_data.train_iterator

    def both_shards(*args, batch_size, shard_index, shard_count, **kwargs):
        assert (shard_index, shard_count) == (0, 1)
        return _BothShards([
            one_shard(*args, batch_size=batch_size // 2, shard_index=i, shard_count=2, **kwargs) for i in range(2)
        ])

    monkeypatch.setattr(align_data, "train_iterator", both_shards)
    align_train.run(cfg, tmp_path / "one")
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5)
    assert len({round(loss, 4) for loss in one.values()}) > 1  # the steps moved the model
