"""The metrics file on resume: one row per step, a row cut short by a kill dropped. The
console: a redrawn bar on a terminal, plain lines otherwise."""

import io
import json
import struct

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
