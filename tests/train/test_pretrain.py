"""End-to-end pretraining: exact resume after SIGKILL, SIGTERM, NaN stop, config errors."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import model
from data import pipeline
from tests.train.tiny_experiment import STEPS, tiny_config, write_tiny_corpus
from train import config as config_lib
from train import loop
from train import pretrain
from train.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _data_config(workdir):
    import ml_collections

    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())["data"])


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    cache = tmp_path_factory.mktemp("cache")
    final = pretrain.run(tiny_config(corpus_dir, cache), workdir)
    return workdir, cache, final


def _launch(corpus_dir, cache, workdir):
    """Run the trainer in a subprocess from a config file that mirrors `tiny_config`."""
    config_file = workdir / "experiment.py"
    config_file.write_text(textwrap.dedent(f"""
        import pathlib
        from tests.train.tiny_experiment import tiny_config
        def get_config():
            return tiny_config(pathlib.Path({str(corpus_dir)!r}), pathlib.Path({str(cache)!r}))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "train.pretrain", f"--config={config_file}", f"--workdir={workdir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_step(process, workdir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{process.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_loss_decreases_and_outputs_are_written(uninterrupted):
    workdir, _, final = uninterrupted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert np.mean([losses[s] for s in range(51, 61)]) < losses[1] - 1.0
    assert final["eval_loss"] < losses[1] - 1.0
    # Bits per byte: the nats of every validation target over the bytes of the decoded text.
    corpus = pipeline.open_corpus(_data_config(workdir))
    val = corpus.split("val")
    documents = [val.document(i) for i in range(val.num_documents)]
    assert final["eval_tokens"] == sum(len(d) - 1 for d in documents)
    text_bytes = sum(len(text.encode()) for text in corpus.tokenizer.decode(documents))
    nats = final["eval_loss"] * final["eval_tokens"]
    assert final["eval_bits_per_byte"] == pytest.approx(nats / np.log(2) / text_bytes, rel=1e-6)
    for name in ("loss_curve.png", "samples.txt", "config.json"):
        assert (workdir / name).stat().st_size > 0
    from tests.train.test_metrics import _events

    texts = {v.tag: v.tensor.string_val[0].decode() for e in _events(workdir / "tensorboard") for v in e.summary.value
             if v.tag.endswith("text_summary")}
    assert (workdir / "samples.txt").read_text() in texts["samples/text_summary"]
    assert '"steps": 60' in texts["config/text_summary"]


def test_killed_run_resumes_on_the_same_trajectory(uninterrupted, corpus_dir, tmp_path):
    reference, cache, _ = uninterrupted
    shards = pipeline.open_corpus(_data_config(reference)).manifest["splits"]["train"]["shards"]
    assert len(shards) >= 8 and all(shard["documents"] for shard in shards)
    process = _launch(corpus_dir, cache, tmp_path)
    _wait_for_step(process, tmp_path, 23)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(_losses(tmp_path))
    assert killed_at < STEPS

    resumed = _launch(corpus_dir, cache, tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from the checkpoint at step" in output
    assert _losses(tmp_path) == _losses(reference)
    evals = lambda w: [(r["step"], r["eval_loss"]) for r in _rows(w) if "eval_loss" in r]
    assert evals(tmp_path) == evals(reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, corpus_dir, tmp_path):
    _, cache, _ = uninterrupted
    process = _launch(corpus_dir, cache, tmp_path)
    _wait_for_step(process, tmp_path, 13)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM: saved the checkpoint at step" in output.strip().splitlines()[-1]
    assert "final validation loss" not in output
    stopped = max(_losses(tmp_path))
    assert stopped < STEPS
    assert "SIGTERM: saved the checkpoint at step" in output
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()


def test_sigterm_during_the_final_evaluation_still_stops_the_run(uninterrupted, corpus_dir, tmp_path, monkeypatch):
    """A SIGTERM after the last step: the final checkpoint is saved, and the run exits with 143
    before its samples, so that a multi-stage driver stops too."""
    _, cache, _ = uninterrupted
    evaluate = pretrain.evaluate

    def evaluate_then_get_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only marks the run preempted
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(pretrain, "evaluate", evaluate_then_get_sigterm)
    monkeypatch.setattr(pretrain, "write_samples", lambda *a, **k: pytest.fail("samples after SIGTERM"))
    cfg = tiny_config(corpus_dir, cache, steps=6)
    cfg.eval.every_steps = 100
    with pytest.raises(SystemExit) as exit_info:
        pretrain.run(cfg, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "checkpoints" / "6").is_dir() and not (tmp_path / "samples.txt").exists()


def test_sigterm_during_an_evaluation_saves_that_step(uninterrupted, corpus_dir, tmp_path, monkeypatch):
    """The save is decided after the evaluation, so a SIGTERM that lands while it runs (at a
    step that is no checkpoint step) loses no steps."""
    _, cache, _ = uninterrupted
    evaluate = pretrain.evaluate

    def evaluate_then_get_sigterm(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(pretrain, "evaluate", evaluate_then_get_sigterm)
    cfg = tiny_config(corpus_dir, cache, steps=6)
    cfg.eval.every_steps = 2
    cfg.checkpoint.every_steps = 100
    with pytest.raises(SystemExit) as exit_info:
        pretrain.run(cfg, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_sigterm_during_a_checkpoint_save_stops_after_it(uninterrupted, corpus_dir, tmp_path, monkeypatch):
    """No step after the saved one, and no second save."""
    _, cache, _ = uninterrupted
    save = Checkpointer.save

    def save_then_get_sigterm(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "save", save_then_get_sigterm)
    cfg = tiny_config(corpus_dir, cache, steps=6)
    cfg.checkpoint.every_steps = 2
    with pytest.raises(SystemExit) as exit_info:
        pretrain.run(cfg, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert max(_losses(tmp_path)) == 2


def test_a_run_counts_as_awaited_by_other_processes_until_its_loop_ends(uninterrupted, corpus_dir, tmp_path, monkeypatch):
    """`train.cli` ends a failing process of a multi-process job at once only while the others
    may wait for it: after a run's loop, and from the start of the next run in the same
    program (a driver's next stage)."""
    _, cache, _ = uninterrupted
    pretrain.run(tiny_config(corpus_dir, cache, steps=6), tmp_path / "first")
    assert not loop.may_be_awaited()
    seen = []

    def record_and_fail(*args, **kwargs):
        seen.append(loop.may_be_awaited())
        raise RuntimeError("the next stage fails while compiling")

    monkeypatch.setattr(pretrain, "compile_steps", record_and_fail)
    with pytest.raises(RuntimeError):
        pretrain.run(tiny_config(corpus_dir, cache, steps=6), tmp_path / "second")
    assert seen == [True]


def test_logged_step_times_leave_out_checkpoint_saves_and_the_schedules_compilation(uninterrupted, corpus_dir, tmp_path, monkeypatch):
    """Every logged interval is steps only: a checkpoint save made slow by a second, and the
    learning-rate schedule's first call (0.3 s of compiling), fall between intervals."""
    _, cache, _ = uninterrupted
    save = Checkpointer.save

    def slow_save(*args, **kwargs):
        save(*args, **kwargs)
        time.sleep(1.0)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    cfg = tiny_config(corpus_dir, cache, steps=8)
    cfg.checkpoint.every_steps = 3
    pretrain.run(cfg, tmp_path)
    step_times = [r["step_time"] for r in _rows(tmp_path) if "step_time" in r]
    assert len(step_times) == 7 and max(step_times) < 0.25, step_times


def test_a_checkpoint_of_another_process_count_is_refused_naming_both(uninterrupted, corpus_dir, tmp_path):
    import shutil

    workdir, cache, _ = uninterrupted
    shutil.copytree(workdir, tmp_path / "run")
    newest = max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    data = tmp_path / "run" / "checkpoints" / str(newest) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as two processes write it
    with pytest.raises(ValueError, match=rf"/{newest} was written by 2 processes and this run has 1: .*nothing was changed"):
        pretrain.run(tiny_config(corpus_dir, cache, steps=STEPS + 5), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / str(newest)).is_dir()


def test_nonfinite_loss_stops_the_run_naming_the_step(uninterrupted, corpus_dir, tmp_path):
    _, cache, _ = uninterrupted
    cfg = tiny_config(corpus_dir, cache, steps=20)
    cfg.optimizer.update(lr=1e12, warmup_steps=0, clip_norm=0.0)
    with pytest.raises(pretrain.NonFiniteError, match=r"non-finite loss or gradients at step \d+"):
        pretrain.run(cfg, tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.batch_size", 6, r"config.train.batch_size=6: micro-batch of 6 sequences is not divisible by the data x fsdp mesh axes \(8 x 1 = 8\)"),
        ("train.seq_len", 128, r"config.train.seq_len=128: exceeds the model's maximum sequence length model.max_seq_len=64"),
        ("train.microbatches", 3, r"config.train.batch_size=8: not divisible by train.microbatches=3"),
        ("mesh.tensor", 3, r"config.mesh=.*needs 24 devices, but there are 8"),
        ("mesh.tensor", 4, r"model.n_kv_heads=1 is not divisible by the 'tensor' mesh axis of size 4"),
        ("optimizer.schedule", "step", r"config.optimizer.schedule='step': expected one of"),
        ("model.norm", "batchnorm", r"model.norm='batchnorm'"),
        ("train.profile_steps", (3, 99), r"config.train.profile_steps=\(3, 99\): expected \(\) or \(first, last\)"),
    ],
)
def test_config_validation_names_the_key(corpus_dir, tmp_path, key, value, message):
    cfg = tiny_config(corpus_dir, tmp_path)
    section, name = key.split(".")
    if key == "mesh.tensor":
        cfg.mesh.data = 2 if value == 4 else 8
    cfg[section][name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg, n_devices=8, n_processes=1)


def test_unknown_override_is_refused_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--config=experiments/quickstart.py",
         f"--workdir={tmp_path}", "--config.train.stepz=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_profile_steps_write_a_trace_of_the_train_step(uninterrupted, corpus_dir, tmp_path):
    _, cache, _ = uninterrupted
    cfg = tiny_config(corpus_dir, cache, steps=6)
    cfg.train.profile_steps = (2, 3)
    pretrain.run(cfg, tmp_path)
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    assert len(traces) == 1 and list(traces[0].parent.glob("*.xplane.pb"))
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    assert sum(e.get("name") == "PjitFunction(train_step)" for e in events) >= 2


def test_evaluate_scores_any_files_with_the_runs_checkpoint_and_tokenizer(uninterrupted, tmp_path):
    from align import source
    from model import sharding
    from train import evaluate

    workdir = uninterrupted[0]
    texts = ["import os\n", "x = [1, 2]\n", "def f(a):\n    return a\n"]
    (tmp_path / "held_out").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "held_out" / f"{i}.py").write_text(text)
    (tmp_path / "held_out" / "empty.py").write_text("")  # no bytes to score: left out
    result = evaluate.evaluate(workdir, evaluate.read_texts([str(tmp_path / "held_out")]), batch_size=8)
    with pytest.raises(ValueError, match=r"no documents with text"):
        evaluate.read_texts([str(tmp_path / "held_out" / "empty.py")])

    # Independently: each document alone through the model, float64 log-softmax.
    start = source.from_workdir(workdir)
    params = jax.device_get(start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config)))
    nats, targets = 0.0, 0
    for document in start.tokenizer.encode_arrays(texts, add_bos=True, add_eos=True):
        assert len(document) <= 33  # one row of seq_len 32: no chunking
        logits = np.asarray(model.forward(start.model_config, params, document[None, :-1]), np.float64)[0]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nats -= float(np.sum(logits[np.arange(len(document) - 1), document[1:]] - log_z))
        targets += len(document) - 1
    assert result["tokens"] == targets and result["documents"] == 3
    np.testing.assert_allclose(result["loss"], nats / targets, rtol=1e-5)
    text_bytes = sum(len(t.encode()) for t in texts)
    np.testing.assert_allclose(result["bits_per_byte"], nats / np.log(2) / text_bytes, rtol=1e-5)


def test_export_command_writes_a_model_and_tokenizer_transformers_loads(uninterrupted, tmp_path):
    import torch
    import transformers

    from align import source
    from model import sharding

    workdir = uninterrupted[0]
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "model.export", f"--workdir={workdir}", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    start = source.from_workdir(workdir)
    # generate() stops at this tokenizer's EOS and pads with its PAD, not transformers' defaults.
    ours_ids = (start.tokenizer.bos_id, start.tokenizer.eos_id, start.tokenizer.pad_id)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == ours_ids
    generation = hf_model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == ours_ids
    text = "import os\nprint(os.getcwd())\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == [start.tokenizer.bos_id] + start.tokenizer.encode([text])[0]
    params = jax.device_get(start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config)))
    ours = np.asarray(model.forward(start.model_config, params, np.asarray([ids])))
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_sample_command_continues_prompts_with_the_runs_tokenizer(uninterrupted):
    """`python -m model.sample` prints the greedy continuation `generate` gives in-process."""
    from align import source
    from model import sharding
    from model.generate import generate

    workdir = uninterrupted[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "model.sample", f"--workdir={workdir}", "--prompt=def f", "--max_new_tokens=6"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    start = source.from_workdir(workdir)
    params = start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config))
    tokenizer = start.tokenizer
    out = generate(start.model_config, params, [[tokenizer.bos_id] + tokenizer.encode(["def f"])[0]],
                   max_new_tokens=6, eos_id=tokenizer.eos_id)
    assert f"--- log-prob {sum(out.logprobs[0]):.3f}\ndef f{tokenizer.decode(out.tokens)[0]}\n" in done.stdout
    beams = subprocess.run(command + ["--beams=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert beams.returncode == 0 and "--- score " in beams.stdout, beams.stderr


def test_pretraining_starts_from_imported_weights_with_their_tokenizer(uninterrupted, corpus_dir, tmp_path):
    from align import source
    from model import sharding
    from model.export import to_hf

    workdir, cache, final = uninterrupted
    start = source.from_workdir(workdir)
    params = start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config))
    to_hf(start.model_config, params, tmp_path / "hf", workdir / "tokenizer.model")
    cfg = tiny_config(corpus_dir, cache, steps=6)
    cfg.model.d_model = 48  # replaced by the imported architecture
    cfg.init.from_hf = str(tmp_path / "hf")
    pretrain.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["data"]["tokenizer"]["path"] == str(tmp_path / "hf" / "tokenizer.model")
    first = _losses(tmp_path / "run")[1]
    assert first < np.log(512) - 1.0  # a fresh model starts near log V; the imported one near its final loss
    assert first == pytest.approx(_losses(workdir)[STEPS], abs=0.5)
