"""End-to-end post-training on 8 fake devices: pretraining -> SFT with LoRA -> DPO and a reward
model, each starting from the previous workdir; a DPO run killed with SIGKILL resumes on the
uninterrupted run's trajectory."""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import model
from align import config as align_config
from align import data as align_data
from align import online, reward, source, trees
from align import train as align_train
from align.tasks import arithmetic
from model import sharding
from tests.train.test_pretrain import _wait_for_step
from tests.train.tiny_experiment import tiny_config, write_tiny_corpus
from train import pretrain
from train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO_STEPS = 12


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    corpus = write_tiny_corpus(tmp_path_factory.mktemp("align_corpus"))
    workdir = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_config(corpus, tmp_path_factory.mktemp("cache"), steps=4)
    cfg.optimizer.warmup_steps = 2
    cfg.sample.max_new_tokens = 2
    pretrain.run(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """SFT examples, and preference pairs of a right answer over a wrong one."""
    directory = tmp_path_factory.mktemp("data")
    arithmetic.write_jsonl(directory / "sft_train.jsonl", arithmetic.sft_records(arithmetic.generate(200, seed=0)))
    arithmetic.write_jsonl(directory / "sft_eval.jsonl", arithmetic.sft_records(arithmetic.generate(16, seed=1, split="test")))
    for split, count in (("train", 64), ("eval", 16)):
        problems = arithmetic.generate(count, seed=2, split="train" if split == "train" else "test")
        pairs = [{"prompt": p.prompt, "chosen": str(p.answer), "rejected": str(p.answer + 1)} for p in problems]
        arithmetic.write_jsonl(directory / f"pairs_{split}.jsonl", pairs)
    return directory


def align_cfg(method, init, data_dir, **sections):
    cfg = align_config.method_config(method)
    cfg.init.from_workdir = str(init)
    prefix = "sft" if method == "sft" else "pairs"
    cfg.data.update(
        train_paths=(str(data_dir / f"{prefix}_train.jsonl"),),
        eval_paths=(str(data_dir / f"{prefix}_eval.jsonl"),),
        max_prompt_len=12,
    )
    cfg.train.update(steps=DPO_STEPS, batch_size=8, seq_len=24, log_every=1)
    cfg.optimizer.update(lr=1e-3, warmup_steps=0, schedule="constant")
    cfg.eval.update(every_steps=100, batch_size=8)
    cfg.checkpoint.update(every_steps=4, keep=2)
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def sft_run(pretrained, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    cfg = align_cfg(
        "sft", pretrained, data_dir, train=dict(steps=6), lora=dict(rank=4),
        task=dict(name="arithmetic", problems=8, max_new_tokens=4),
    )
    return workdir, cfg, align_train.run(cfg, workdir)


def test_sft_with_lora_trains_and_evaluates(sft_run):
    workdir, _, result = sft_run
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    assert set(result.last_eval) >= {"eval_loss", "eval_accuracy", "eval_task_reward"}
    assert 0.0 <= result.last_eval["eval_task_reward"] <= 1.0
    assert (workdir / "training.png").stat().st_size > 0
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["train"]["examples"] == 200


def test_the_next_run_starts_from_the_merged_sft_policy(sft_run):
    workdir, cfg, result = sft_run
    expected = jax.device_get(trees.policy(cfg, result.state.params, result.state.frozen))
    mesh = sharding.make_mesh((-1, 1, 1))
    loaded = jax.device_get(source.from_workdir(workdir).load_params(mesh))
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def _launch(cfg_json, workdir):
    config_file = workdir.parent / f"{workdir.name}_experiment.py"
    config_file.write_text(textwrap.dedent(f"""
        import json
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(json.loads({cfg_json!r}))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "align.train", f"--config={config_file}", f"--workdir={workdir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_dpo_killed_resumes_on_the_uninterrupted_trajectory(sft_run, data_dir, tmp_path_factory):
    sft_workdir, _, _ = sft_run
    # Synchronous saves every 2 steps: a kill after step 5 always finds a finished checkpoint,
    # and the saves keep the run slow enough to be killed before it ends.
    cfg = align_cfg(
        "dpo", sft_workdir, data_dir, dpo=dict(reference="cached", beta=0.5),
        checkpoint=dict(every_steps=2, async_save=False),
    )
    reference = tmp_path_factory.mktemp("dpo")
    result = align_train.run(cfg, reference)
    losses = _losses(reference)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    rows = read_metrics(reference / "metrics.jsonl")
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    assert margins[0] == 0.0 and margins[-1] > 0.0
    assert result.last_eval["eval_rewards/accuracies"] >= 0.0

    killed = tmp_path_factory.mktemp("dpo_killed")
    process = _launch(cfg.to_json(), killed)
    _wait_for_step(process, killed, 5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(killed)) < DPO_STEPS
    resumed = _launch(cfg.to_json(), killed)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from the checkpoint at step" in output
    assert _losses(killed) == losses


def test_a_fresh_dpo_run_recomputes_a_reference_cache_it_finds(sft_run, data_dir, tmp_path):
    """A cache left by a run killed before its first checkpoint may be of another starting
    model: a run with no checkpoint to resume computes the reference anew (policy = reference
    at step 1); a resumed run keeps it (the SIGKILL test above)."""
    cfg = align_cfg("dpo", sft_run[0], data_dir, dpo=dict(reference="cached"), train=dict(steps=1))
    align_train.run(cfg, tmp_path / "first")
    cache = align_train.REFERENCE_CACHE.format(split="train")
    computed = np.load(tmp_path / "first" / cache)
    (tmp_path / "second").mkdir()
    np.save(tmp_path / "second" / cache, computed - 17.0)  # as if from another model
    align_train.run(cfg, tmp_path / "second")
    np.testing.assert_array_equal(np.load(tmp_path / "second" / cache), computed)
    assert read_metrics(tmp_path / "second" / "metrics.jsonl")[0]["rewards/margins"] == 0.0


def rl_cfg(method, init, data_dir, **sections):
    cfg = align_cfg(method, init, data_dir, task=dict(name="arithmetic", problems=8, max_new_tokens=4))
    cfg.train.update(steps=4, batch_size=8)
    cfg.rl.update(train_problems=64, samples_per_prompt=2)
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_the_first_minibatch_of_each_rollout_is_on_policy(method, sft_run, data_dir, tmp_path):
    """One epoch of one minibatch: every update is the first of its rollout, so the policy is
    the sampler: ratio exactly 1, nothing clipped, approximate KL 0; the metrics carry their
    usual names."""
    cfg = rl_cfg(method, sft_run[0], data_dir, rl=dict(kl_target=6.0) if method == "ppo" else {})
    result = align_train.run(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["policy/ratio_avg"] == 1.0 and row["policy/clipfrac_avg"] == 0.0
        assert 0.0 <= row["objective/scores"] <= 1.0 and 1.0 <= row["response_length"] <= 4.0
        assert row["time/generation_s"] > 0.0 and row["time/scoring_s"] > 0.0
    assert rows[0]["objective/kl"] == 0.0  # the policy starts as the reference
    if method == "ppo":
        # The update and the rollout's scoring are separately compiled: their log-probs differ
        # by float32 rounding (|log ratio| ~ 1e-7), so approxkl = 0.5 mean(log ratio^2) ~ 1e-14.
        assert all(r["policy/approxkl_avg"] < 1e-12 and r["val/clipfrac_avg"] == 0.0 for r in rows)
        assert rows[0]["objective/kl_coef"] == pytest.approx(cfg.rl.kl_coef, rel=1e-6)
        # KL far below the target 6: the controller's error clips at -0.2, so each of the 4
        # steps multiplies the coefficient by 1 - 0.2 x 16 rollouts / horizon 10^4.
        coef = float(result.state.frozen["kl_coef"])
        assert coef == pytest.approx(cfg.rl.kl_coef * (1 - 0.2 * 16 / 10_000) ** 4, rel=1e-6)
    else:
        assert all(0.0 <= r["zero_variance_groups"] <= 1.0 for r in rows)
    assert "eval_accuracy" in result.last_eval


def test_ppo_killed_resumes_on_the_uninterrupted_trajectory(sft_run, data_dir, tmp_path_factory):
    cfg = rl_cfg(
        # The tiny model's answers are all wrong and score 0: the penalty for responses
        # without EOS (none ends within 4 tokens) gives the advantages something to follow.
        "ppo", sft_run[0], data_dir, train=dict(steps=8), rl=dict(epochs=2, minibatches=2, missing_eos_penalty=1.0),
        checkpoint=dict(every_steps=2, async_save=False),
    )
    reference = tmp_path_factory.mktemp("ppo")
    align_train.run(cfg, reference)
    rows = [r for r in read_metrics(reference / "metrics.jsonl") if "loss" in r]
    # Two epochs of two minibatches: the later updates are off-policy, the value head learns.
    assert any(r["policy/approxkl_avg"] > 0.0 for r in rows) and rows[-1]["loss/value_avg"] > 0.0
    killed = tmp_path_factory.mktemp("ppo_killed")
    process = _launch(cfg.to_json(), killed)
    _wait_for_step(process, killed, 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(killed)) < 8
    resumed = _launch(cfg.to_json(), killed)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from the checkpoint at step" in output
    assert _losses(killed) == _losses(reference)


def test_an_unfinished_reward_run_is_refused_as_a_scorer(reward_run, tmp_path):
    """Its rewards are normalized when it finishes; before, a scorer would read raw rewards."""
    workdir, _, _ = reward_run
    stopped = tmp_path / "reward"
    shutil.copytree(workdir, stopped)
    config = json.loads((stopped / "config.json").read_text())
    config["train"]["steps"] = 20  # the run now stopped at its step 10 of 20
    (stopped / "config.json").write_text(json.dumps(config))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"stopped at step 10 of 20, before its rewards were normalized"):
        source.reward_model(stopped, mesh)


@pytest.fixture(scope="module")
def reward_run(pretrained, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward")
    cfg = align_cfg("reward", pretrained, data_dir, train=dict(steps=10), reward=dict(center_coeff=0.01))
    return workdir, cfg, align_train.run(cfg, workdir)


def _eval_pairs(cfg, tokenizer):
    examples, _ = align_data.load("preference", cfg.data, tokenizer, split="eval", seq_len=cfg.train.seq_len)
    return next(align_data.eval_batches(examples, "preference", seq_len=cfg.train.seq_len, batch_size=16))


def test_reward_model_learns_the_pairs_and_stores_its_normalization(reward_run):
    workdir, cfg, result = reward_run
    rows = read_metrics(workdir / "metrics.jsonl")
    assert rows[-1]["eval_pairwise_accuracy"] >= 0.0 and "rewards/std" in rows[0]
    norm = jax.device_get(result.state.frozen["normalization"])
    start = source.from_workdir(workdir)
    batch = _eval_pairs(cfg, start.tokenizer)
    raw = np.asarray(reward.rewards(cfg, start.model_config, jax.device_get(result.state.params), {}, batch))
    np.testing.assert_allclose(float(norm["mean"]), raw.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(norm["std"]), raw.std(), rtol=1e-4)


def test_the_reward_model_reads_a_rollout_as_it_read_its_pairs(reward_run, data_dir):
    """A sampled response, left-padded behind its prompt with EOS and filler after it, gets the
    reward its training row (right-padded, EOS a target only) gets."""
    workdir, cfg, _ = reward_run
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    scorer = source.reward_model(workdir, mesh)
    tokenizer = scorer.tokenizer
    pairs = [json.loads(line) for line in (data_dir / "pairs_eval.jsonl").read_text().splitlines()]
    expected = np.asarray(reward.normalized_rewards(
        cfg, scorer.model_config, scorer.params, {"normalization": scorer.normalization}, _eval_pairs(cfg, tokenizer)
    ))[:, 0]
    P, N, eos = 12, 6, tokenizer.eos_id
    prompts, lengths, tokens = np.zeros((len(pairs), P), np.int32), np.zeros(len(pairs), np.int32), np.full((len(pairs), N), 7, np.int32)
    for row, pair in enumerate(pairs):
        prompt = [tokenizer.bos_id] + tokenizer.encode([pair["prompt"]])[0]
        response = tokenizer.encode([pair["chosen"]])[0] + [eos]
        prompts[row, P - len(prompt):], lengths[row] = prompt, len(prompt)
        tokens[row, : len(response)] = response
    mask, _ = online.response_mask(tokens, eos)
    scores = online.reward_model_scorer(scorer, mesh)(online.reward_model_rows(prompts, lengths, tokens, mask, eos))
    np.testing.assert_allclose(scores, expected[: len(pairs)], rtol=1e-4, atol=1e-5)


def test_ppo_scored_by_a_reward_model_starts_its_value_head_from_it(reward_run, sft_run, data_dir, tmp_path):
    """At learning rate 0 the value head stays where it started: the reward model's head over
    its normalization; the checker's reward is logged beside the model's scores."""
    cfg = rl_cfg(
        "ppo", sft_run[0], data_dir, train=dict(steps=2), optimizer=dict(lr=0.0),
        rl=dict(reward_model=str(reward_run[0]), value_init="reward_model"),
    )
    result = align_train.run(cfg, tmp_path)
    score, norm = (jax.device_get(reward_run[2].state.params["score"]), jax.device_get(reward_run[2].state.frozen["normalization"]))
    value = jax.device_get(result.state.params["value"])
    np.testing.assert_allclose(value["w"], score["w"] / norm["std"], rtol=1e-6)
    np.testing.assert_allclose(value["b"], (score["b"] - norm["mean"]) / norm["std"], rtol=1e-6, atol=1e-7)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(0.0 <= r["objective/task_reward"] <= 1.0 for r in rows)
    assert all(math.isfinite(r["objective/scores"]) for r in rows)


def test_a_run_starts_from_hugging_face_weights_with_their_tokenizer(pretrained, data_dir, tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    cfg = align_cfg("sft", pretrained, data_dir)
    cfg.init.update(from_workdir="", from_hf=str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="no SentencePiece model at .*set init.tokenizer"):
        source.resolve(cfg)
    cfg.init.tokenizer = str(pretrained / "tokenizer.model")
    start = source.resolve(cfg)
    mesh = sharding.make_mesh((-1, 1, 1))
    loaded = jax.device_get(start.load_params(mesh))
    _, expected = model.from_hf(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(expected))
    assert start.tokenizer.vocab_size == 512


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("method", "rloo", r"config.method='rloo': expected one of \('sft', 'dpo', 'kto', 'reward', 'ppo', 'grpo'\)"),
        ("init.from_hf", "/x", r"config.init=.*set exactly one of init.from_workdir and init.from_hf"),
        ("dpo.loss_type", "exp", r"config.dpo.loss_type='exp': expected one of"),
        ("dpo.reference", "model", r"config.dpo.reference='model'"),
        ("data.max_prompt_len", 24, r"config.data.max_prompt_len=24: must be below train.seq_len=24"),
        ("lora.rank", -1, r"config.lora.rank=-1"),
        ("dpo.beta", 0.0, r"config.dpo.beta=0.0: must be positive"),
        ("dpo.label_smoothing", 0.5, r"config.dpo.label_smoothing=0.5: must be in \[0, 0.5\)"),
        ("kto.beta", -0.1, r"config.kto.beta=-0.1: must be positive"),
    ],
)
def test_config_errors_name_the_key(tmp_path, key, value, message):
    cfg = align_cfg("dpo", tmp_path, tmp_path)
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ValueError, match=message):
        align_config.validate(cfg, n_devices=8, n_processes=1)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rl.minibatches", 3, r"config.rl.minibatches=3: must divide the rollout's 16 rows"),
        ("rl.kl_estimator", "k4", r"config.rl.kl_estimator='k4': expected one of"),
        ("rl.samples_per_prompt", 1, r"config.rl.samples_per_prompt=1: GRPO compares samples of one prompt"),
        ("task.name", "", r"config.task.name='': grpo takes its prompts and rewards from a task"),
        ("rl.value_init", "reward_model", r"config.rl.value_init='reward_model': needs rl.reward_model"),
        ("rl.kl_horizon", 0, r"config.rl.kl_horizon=0: must be positive"),
        ("rl.samples_per_prompt", 0, r"config.rl.samples_per_prompt=0: must be at least 1"),
        ("rl.clip_eps", -0.2, r"config.rl.clip_eps=-0.2: must be positive"),
        ("rl.kl_target", -1.0, r"config.rl.kl_target=-1.0: must be >= 0"),
        ("rl.missing_eos_penalty", -5.0, r"config.rl.missing_eos_penalty=-5.0: must be >= 0"),
        ("rl.missing_eos_penalty", 1.0, r"config.rl.missing_eos_penalty=1.0: a PPO setting, which GRPO does not use"),
        ("rl.gamma", 0.9, r"config.rl.gamma=0.9: a PPO setting"),
        ("task.max_new_tokens", 0, r"config.task.max_new_tokens=0: must be at least 1"),
        ("task.max_new_tokens", 10_000, r"config.task.max_new_tokens=10000: with data.max_prompt_len=\d+, exceeds"),
    ],
)
def test_online_config_errors_name_the_key(tmp_path, key, value, message):
    cfg = rl_cfg("grpo", tmp_path, tmp_path)
    section, _, name = key.rpartition(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=message):
        align_config.validate(cfg, n_devices=8, n_processes=1)


def test_rerunning_a_finished_run_says_so_and_writes_no_rows(pretrained, caplog):
    import logging

    import ml_collections

    rows = read_metrics(pretrained / "metrics.jsonl")
    cfg = ml_collections.ConfigDict(json.loads((pretrained / "config.json").read_text()))
    with caplog.at_level(logging.INFO, logger="train"):
        final = pretrain.run(cfg, pretrained)
    assert "is already finished (step 4 of 4)" in caplog.text
    assert read_metrics(pretrained / "metrics.jsonl") == rows
    assert final["eval_loss"] == rows[-1]["eval_loss"]
