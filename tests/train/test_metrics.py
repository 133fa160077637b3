"""The metrics file on resume: one row per step, a row cut short by a kill dropped. The
console: a redrawn bar on a terminal, plain lines otherwise. TensorBoard and W&B get what is
logged; the TensorBoard writer leaves torch unimported."""

import io
import json
import pathlib
import struct
import subprocess
import sys

import pytest

from train.metrics import MetricsWriter, Progress, read_metrics


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resume_drops_rows_after_the_restored_step_and_a_partial_last_line(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)], tail='{"step": 5, "lo')
    writer = MetricsWriter(tmp_path, resume_step=3)
    writer.write(4, {"loss": 0.2})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]


def test_a_malformed_row_before_the_last_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON row"):
        MetricsWriter(tmp_path, resume_step=3)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_plain_lines_without_a_terminal():
    stream = io.StringIO()
    progress = Progress(total_steps=40, first_step=0, stream=stream)
    progress.update(10, 6.8975, 6826.4, None, 104.8e9)
    progress.evaluation(20, {"eval_loss": 6.8271, "eval_perplexity": 922.03, "eval_tokens": 70925.0})
    progress.update(20, 6.5, 6570.0, 0.4123, 1e12)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "step 10/40: loss 6.8975, 6,826 tok/s, 104.8 GFLOP/s",
        "step 20/40 validation: loss 6.827, perplexity 922, tokens 70,925",
        "step 20/40: loss 6.5000, 6,570 tok/s, MFU 41.2%",
    ]


def test_progress_redraws_one_bar_on_a_terminal():
    stream = _Terminal()
    progress = Progress(total_steps=40, first_step=10, stream=stream)
    progress.update(20, 6.8975, 6826.4, None, None)
    progress.update(30, 6.5, 6570.0, None, None)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and text.count("\n") == 1  # redrawn in place, one line left at the end
    assert "30/40" in text and "loss 6.5000, 6,570 tok/s" in text


def _events(directory):
    """Every Event of the TFRecord event files in `directory`."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            events.append(Event.FromString(data[12 : 12 + length]))
            data = data[16 + length :]
    return events


def test_hyperparameters_reach_tensorboard(tmp_path):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    writer = MetricsWriter(tmp_path, resume_step=0)
    writer.hyperparameters({"train": {"steps": 5, "profile_steps": [2, 3]}, "model": {"norm": "rms"}})
    writer.close()
    values = {v.tag: v for e in _events(tmp_path / "tensorboard") for v in e.summary.value}
    start = HParamsPluginData.FromString(values["_hparams_/session_start_info"].metadata.plugin_data.content)
    hparams = start.session_start_info.hparams
    assert hparams["train.steps"].number_value == 5.0
    assert hparams["model.norm"].string_value == "rms"
    assert hparams["train.profile_steps"].string_value == "[2, 3]"
    assert '"steps": 5' in values["config/text_summary"].tensor.string_val[0].decode()


def test_the_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch when it can (2 s); a run never needs it, and a later import
    of torch still works."""
    script = (
        "import sys; from train.metrics import MetricsWriter\n"
        f"MetricsWriter(__import__('pathlib').Path({str(tmp_path)!r}), resume_step=0).close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch; print(torch.tensor([2.0]).item())\n"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.0"
    assert list((tmp_path / "tensorboard").iterdir())


def _wandb_records(path):
    """The records of a W&B transaction log (`run-ID.wandb`): a 7-byte header, then LevelDB
    log blocks of 32 KiB whose chunks (CRC, length, type) hold protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks = 7, []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield Record.FromString(b"".join(chunks))
            chunks = []


def test_wandb_gets_the_scalars_hyperparameters_and_samples_and_resumes_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    workdir.mkdir()
    writer = MetricsWriter(workdir, resume_step=0, wandb_project="lmx-test")
    writer.hyperparameters({"train": {"steps": 5, "profile_steps": [2, 3]}, "model": {"norm": "rms"}})
    writer.write(1, {"loss": 2.5, "lr": 1e-3})
    writer.write(2, {"loss": 2.0, "lr": 2e-3})
    writer.write(2, {"eval_loss": 2.25})
    writer.text("samples", "def f():\n    return 1\n", 2)
    writer.close()
    writer = MetricsWriter(workdir, resume_step=2, wandb_project="lmx-test")
    writer.write(3, {"loss": 1.5})
    writer.close()
    wandb.teardown()  # W&B's service writes the logs in the background: wait for it

    first, resumed = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (workdir / "wandb_run_id").read_text()
    assert first.name.endswith(run_id) and resumed.name.endswith(run_id)
    records = list(_wandb_records(first / f"run-{run_id}.wandb"))
    history = [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
        for r in records if r.HasField("history")
    ]
    scalars = [{k: v for k, v in row.items() if k in ("_step", "loss", "lr", "eval_loss")} for row in history]
    assert scalars == [{"_step": 1, "loss": 2.5, "lr": 1e-3}, {"_step": 2, "loss": 2.0, "lr": 2e-3, "eval_loss": 2.25}]
    assert history[1]["samples/_type"] == "table-file"
    [table] = (first / "files" / "media" / "table").glob("samples_2_*.table.json")
    assert json.loads(table.read_text())["data"] == [["def f():\n    return 1\n"]]
    config = {
        "/".join(item.nested_key) or item.key: json.loads(item.value_json)
        for r in records if r.HasField("config") for item in r.config.update
    }
    assert config["train.steps"] == 5 and config["model.norm"] == "rms" and config["train.profile_steps"] == "[2, 3]"
    resumed_history = [r for r in _wandb_records(resumed / f"run-{run_id}.wandb") if r.HasField("history")]
    assert {item.key or item.nested_key[0]: item.value_json for item in resumed_history[0].history.item}["loss"] == "1.5"
