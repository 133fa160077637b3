"""A run stopped by an error ends with that error: pending checkpoint saves finish first, no
temporary checkpoint directory is left, and no second traceback follows."""

import os
import pathlib
import subprocess
import sys
import textwrap

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
    assert "non-finite loss or gradients at step" in lines[-1], result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1
    assert not list((tmp_path / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert not (tmp_path / "run" / "run.lock").exists()
