"""The metrics file on resume: one row per step, a row cut short by a kill dropped."""

import json

import pytest

from train.metrics import MetricsWriter, read_metrics


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
