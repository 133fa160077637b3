"""A run stopped by an error ends with that error, in one line: pending checkpoint saves
finish first, no temporary checkpoint directory is left, no traceback is printed. Inputs the
command line cannot apply (an unknown key, a missing config file) stop it before any work."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_nonfinite_stop_ends_with_its_message_and_leaves_no_partial_checkpoint(tmp_path):
    config_file = tmp_path / "experiment.py"
    config_file.write_text(textwrap.dedent(f"""
        import pathlib
        from tests.train.tiny_experiment import tiny_config, write_tiny_corpus
        def get_config():
            corpus = pathlib.Path({str(tmp_path / "corpus")!r})
            corpus.mkdir(exist_ok=True)
            cfg = tiny_config(write_tiny_corpus(corpus), pathlib.Path({str(tmp_path / "cache")!r}), steps=20)
            cfg.optimizer.update(lr=1e12, warmup_steps=0, clip_norm=0.0)
            cfg.checkpoint.every_steps = 1
            return cfg
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "train.pretrain", f"--config={config_file}", f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: non-finite loss or gradients at step"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # Every step is a checkpoint step: the last one saved is the step before the failed one.
    failed = int(re.search(r"at step (\d+)", lines[-1])[1])
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == failed - 1
    assert not list((tmp_path / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert not (tmp_path / "run" / "run.lock").exists()


def test_sample_refuses_sampling_settings_with_beam_search(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "model.sample", f"--workdir={tmp_path}", "--prompt=x", "--beams=2", "--temperature=0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: --beams=2 searches; it takes none of ['--temperature']"]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (
            ["--config=experiments/quickstart.py", "--config.train.stpes=10"],
            'error: --config.train.stpes=10: no config key \'stpes\'. Did you mean "steps" instead of "stpes"?',
        ),
        (
            ["--config=experiments/quickstart.py", "--config.tokenizer.path=x.model"],
            "error: --config.tokenizer.path=x.model: no config key 'tokenizer'.",
        ),
        (
            ["--config=experiments/no_such_file.py"],
            "error: --config=experiments/no_such_file.py: [Errno 2] No such file or directory: "
            "'experiments/no_such_file.py'",
        ),
        (
            ["--config=experiments/quickstart.py", "--config.data.tokenizer.path=README.md"],
            "error: data.tokenizer.path='README.md': README.md: not a SentencePiece model file",
        ),
    ],
)
def test_a_refused_input_is_one_line_before_any_work(tmp_path, arguments, expected):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.pretrain", *arguments, f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [expected], result.stderr
    assert not workdir.exists()
