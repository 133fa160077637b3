"""The methods' losses and updates on a tiny model: values at initialization, what the masks
exclude, one 2B pass against two passes, the reward head's last token, LoRA's trainable leaves."""

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from align.config import method_config as _cfg
from align import data, dpo, kto, online, reward, sft, trees
from align import train as align_train
from align.tasks import arithmetic
from align.logprobs import response_logps
from model import sharding
from model.generate import Generation
from train.optimizer import make_optimizer
from train.state import init_state, state_shardings
from train.step import compile_train_step, reported

CONFIG = model.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
)
T = 16


def _trees(cfg, seed=0):
    base = model.init_params(CONFIG, jax.random.key(seed))
    return nn.meta.unbox(trees.trees(cfg, CONFIG, base, jax.random.key(seed + 1)))


def _row(prompt, response, rng):
    """One right-padded row: [BOS] prompt response [EOS] as next-token pairs."""
    tokens = [2] + list(prompt) + list(response) + [3]
    n = len(tokens) - 1
    row = {key: np.zeros(T, np.int32) for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
    row["loss_mask"][len(prompt) : n] = 1  # targets from the first response token to EOS
    return row


def _pairs(batch_size=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch_size):
        prompt = rng.integers(4, 64, size=rng.integers(2, 6))
        chosen, rejected = (rng.integers(4, 64, size=rng.integers(1, 6)) for _ in range(2))
        rows.append([_row(prompt, chosen, rng), _row(prompt, rejected, rng)])
    return {key: np.stack([[r[key] for r in pair] for pair in rows]) for key in rows[0][0]}


def _loss(loss_fn, params, frozen, batch):
    out = loss_fn(params, frozen, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    return float(out.objective) / float(out.weight), {k: float(v) for k, v in reported(out.metrics, out.weight).items()}


def test_dpo_at_policy_equal_reference_is_ln2_with_zero_margins():
    cfg = _cfg("dpo", dpo=dict(reference="online"))
    params, frozen = _trees(cfg)
    loss, metrics = _loss(dpo.loss_fn(cfg, CONFIG), params, frozen, _pairs())
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/chosen"] == 0.0
    assert metrics["logps/chosen"] < 0.0


def test_cached_reference_equals_online_reference():
    online, cached = _cfg("dpo", dpo=dict(reference="online")), _cfg("dpo", dpo=dict(reference="cached"))
    params, frozen = _trees(online)
    batch = _pairs()
    moved = jax.tree.map(lambda w: w * 1.1, params)  # a policy that differs from the reference
    batch["reference_logps"] = np.asarray(response_logps(CONFIG, frozen["reference"], batch)[0])
    a = _loss(dpo.loss_fn(online, CONFIG), moved, frozen, batch)
    b = _loss(dpo.loss_fn(cached, CONFIG), moved, {}, batch)
    assert a[0] == pytest.approx(b[0], rel=1e-6) and a[0] != pytest.approx(math.log(2), abs=1e-3)


def test_prompt_targets_and_padding_contribute_nothing():
    cfg = _cfg("dpo", dpo=dict(reference="none"))
    params, frozen = _trees(cfg)
    batch = _pairs()
    loss, _ = _loss(dpo.loss_fn(cfg, CONFIG), params, frozen, batch)
    perturbed = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(9)
    unmasked = perturbed["loss_mask"] == 0
    perturbed["targets"][unmasked] = rng.integers(4, 64, size=unmasked.sum())
    padding = perturbed["segment_ids"] == 0
    perturbed["inputs"][padding] = rng.integers(4, 64, size=padding.sum())
    assert _loss(dpo.loss_fn(cfg, CONFIG), params, frozen, perturbed)[0] == loss


def test_one_pass_over_2b_rows_equals_two_passes():
    params = model.init_params(CONFIG, jax.random.key(0))
    batch = _pairs()
    together, counts = response_logps(CONFIG, params, batch)
    for index in (0, 1):
        alone, alone_counts = response_logps(CONFIG, params, {k: v[:, index] for k, v in batch.items()})
        np.testing.assert_allclose(together[:, index], alone, rtol=1e-6)
        np.testing.assert_array_equal(counts[:, index], alone_counts)
    # Against a float64 log-softmax of the full forward pass.
    logits = np.asarray(model.forward(CONFIG, params, batch["inputs"][:, 0], segment_ids=batch["segment_ids"][:, 0]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][:, 0][..., None], -1)[..., 0]
    np.testing.assert_allclose(together[:, 0], (picked * batch["loss_mask"][:, 0]).sum(-1), rtol=1e-5)


def test_sft_loss_is_the_mean_nll_of_response_tokens():
    cfg = _cfg("sft")
    params, frozen = _trees(cfg)
    rows = {k: v[:, 0] for k, v in _pairs().items()}
    loss, _ = _loss(sft.loss_fn(cfg, CONFIG), params, frozen, rows)
    logps, counts = response_logps(CONFIG, params["model"], rows)
    assert loss == pytest.approx(-float(jnp.sum(logps)) / float(jnp.sum(counts)), rel=1e-5)


def test_kto_at_policy_equal_reference_is_one_half():
    cfg = _cfg("kto")
    params, frozen = _trees(cfg)
    batch = _pairs()
    batch["label"] = np.asarray([1, 0, 1, 1], np.float32)
    loss, metrics = _loss(kto.loss_fn(cfg, CONFIG), params, frozen, batch)
    assert loss == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every example
    assert metrics["kl"] == 0.0


@pytest.mark.parametrize("microbatches", [1, 2])
def test_kto_logs_each_class_mean_reward_whatever_the_micro_batches_hold(microbatches):
    """Labels desirable, desirable, undesirable, undesirable: with two micro-batches each
    holds one class only, and each class's logged mean is still the mean over the step."""
    cfg = _cfg("kto", kto=dict(beta=0.5), optimizer=dict(warmup_steps=0))
    params, frozen = _trees(cfg)
    params = jax.tree.map(lambda w: w * 1.3, params)  # a policy away from the reference
    batch = _pairs(seed=5)
    batch["label"] = np.asarray([1, 1, 0, 0], np.float32)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(cfg.optimizer, 100)
    shardings = state_shardings(optimizer, mesh, *trees.boxed_trees(cfg, CONFIG))
    step = compile_train_step(kto.loss_fn(cfg, CONFIG), optimizer, mesh, shardings, microbatches=microbatches)
    matched = {k: v[:, 0] for k, v in batch.items() if k != "label"}
    rewards = 0.5 * (response_logps(CONFIG, params["model"], matched)[0] - response_logps(CONFIG, frozen["reference"], matched)[0])
    with jax.set_mesh(mesh):  # the step takes the state's buffers (donated)
        _, metrics = step(init_state(params, optimizer, 0, frozen), batch)
    assert abs(float(rewards[0] - rewards[2])) > 1e-3
    np.testing.assert_allclose(float(metrics["rewards/desirable"]), float(jnp.mean(rewards[:2])), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/undesirable"]), float(jnp.mean(rewards[2:])), rtol=1e-4)


def test_reward_is_read_at_the_last_real_token_under_left_and_right_padding():
    cfg = _cfg("reward")
    params, frozen = _trees(cfg)
    tokens = np.asarray([2, 17, 5, 40, 9, 3], np.int32)
    n = tokens.size
    right = {"inputs": np.zeros(T, np.int32), "segment_ids": np.zeros(T, np.int32), "positions": np.zeros(T, np.int32)}
    right["inputs"][:n], right["segment_ids"][:n], right["positions"][:n] = tokens, 1, np.arange(n)
    left = {k: np.roll(v, T - n) for k, v in right.items()}
    batch = {k: np.stack([right[k], left[k]]) for k in right}
    r = np.asarray(reward.rewards(cfg, CONFIG, params, frozen, batch))
    hidden = model.hidden_states(CONFIG, params["model"], tokens[None])[0, -1]
    expected = float(np.asarray(hidden, np.float64) @ np.asarray(params["score"]["w"], np.float64) + float(params["score"]["b"]))
    np.testing.assert_allclose(r, [expected, expected], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reward.last_token_index(batch["segment_ids"]), [n - 1, T - 1])


def test_reward_model_flops_are_the_compiled_forwards_count_times_three():
    """The reward model's FLOPs per token, credited as 3 forward passes' worth, against XLA's
    count of its compiled forward (no vocabulary head; 1% for norms and activations), on two
    layers of GPT-2 124M at T = 256."""
    config = model.get_config("gpt2-124m", n_layers=2, scan_layers=False)
    B, T = 2, 256
    params = nn.meta.unbox(model.abstract_params(config))
    score = {"w": jax.ShapeDtypeStruct((config.d_model,), jnp.float32), "b": jax.ShapeDtypeStruct((), jnp.float32)}
    rows = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {"inputs": rows, "segment_ids": rows, "positions": rows}
    compiled = jax.jit(functools.partial(reward.head_rewards, config)).lower(params, score, batch).compile()
    cost = compiled.cost_analysis()
    forward = (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)
    assert reward.flops_per_token(config, T) / 3 == pytest.approx(forward, rel=0.01)


class _IdTokenizer:
    """Texts of space-separated token ids."""

    bos_id, eos_id = 2, 3

    def encode_arrays(self, texts):
        return [np.asarray([int(t) for t in text.split()], np.int32) for text in texts]


class _DigitTokenizer:
    """Ids 10-19 are the digits 0-9; PAD, BOS and EOS decode to nothing, as SentencePiece's do."""

    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, texts):
        return [[10 + int(c) for c in text if c.isdigit()] for text in texts]

    def decode(self, rows):
        return ["".join(str(i - 10) for i in row if i >= 10) for row in rows]


def test_a_response_holding_pad_or_bos_scores_zero_though_its_text_is_right():
    tokens = np.asarray([[14, 11, 17, 3, 0, 0], [14, 0, 11, 17, 3, 0], [14, 11, 2, 17, 3, 0], [14, 11, 16, 3, 0, 0]])
    mask, ended = online.response_mask(tokens, eos_id=3)
    assert ended.all()
    rewards = online.scores(_DigitTokenizer(), tokens, mask, np.full(4, 417))
    assert rewards[0] == 1.0 and rewards[1] == rewards[2] == 0.0
    assert 0.0 < rewards[3] < 1.0  # 416: the checker's partial credit, PAD after EOS ignored


def test_held_out_accuracy_reads_a_response_holding_pad_as_wrong(monkeypatch):
    """Greedy held-out accuracy scores responses as the rollouts do (`online.response_texts`)."""
    cfg = _cfg("sft", task=dict(name="arithmetic", problems=4))
    t = cfg.task
    problems = arithmetic.generate(t.problems, seed=t.seed, min_digits=t.min_digits, max_digits=t.max_digits, split="test")
    rows = [[10 + int(c) for c in str(p.answer)] + [3] for p in problems]
    rows[0].insert(1, 0)  # the right digits with PAD among them

    def right_answers(config, params, prompts, max_new_tokens, eos_id):
        assert len(prompts) == len(problems) and eos_id == 3
        return Generation(rows, [[0.0] * len(r) for r in rows])

    monkeypatch.setattr(align_train, "generate", right_answers)
    scores = align_train.task_accuracy(cfg, None, _DigitTokenizer(), None)
    assert scores == {"accuracy": 0.75, "task_reward": 0.75}


def test_a_cut_response_is_read_at_its_last_kept_token_in_pairs_and_rollouts(tmp_path):
    """A response cut to fit its row gets the reward of the prompt and the response tokens the
    row keeps, both as a training pair (align/data.py) and as a rollout without EOS."""
    cfg = _cfg("reward")
    params, frozen = _trees(cfg)
    path = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(0)
    long_response = lambda: " ".join(map(str, rng.integers(4, 64, size=2 * T)))
    path.write_text(json.dumps({"prompt": "17 5", "chosen": long_response(), "rejected": long_response()}) + "\n")
    data_cfg = data.default_config()
    data_cfg.update(train_paths=(str(path),), max_prompt_len=4)
    examples, _ = data.load("preference", data_cfg, _IdTokenizer(), split="train", seq_len=T)
    batch = next(data.eval_batches(examples, "preference", seq_len=T, batch_size=1))
    kept = batch["targets"][0, 0][batch["loss_mask"][0, 0] > 0]  # the response tokens it scores
    tokens = np.concatenate([[2, 17, 5], kept])
    hidden = model.hidden_states(CONFIG, params["model"], tokens[None])[0, -1]
    expected = float(np.asarray(hidden, np.float64) @ np.asarray(params["score"]["w"], np.float64) + float(params["score"]["b"]))
    paired = float(reward.rewards(cfg, CONFIG, params, frozen, batch)[0, 0])
    prompts = np.asarray([[0, 0, 2, 17, 5]], np.int32)  # left-padded, as a rollout's
    mask, ended = online.response_mask(kept[None], eos_id=3)
    rows = online.reward_model_rows(prompts, np.asarray([3], np.int32), kept[None], mask, eos_id=3)
    rollout = float(reward.rewards(cfg, CONFIG, params, frozen, rows)[0])
    assert not ended[0] and kept.size > 1
    np.testing.assert_allclose([paired, rollout], [expected, expected], rtol=1e-5, atol=1e-6)


def _train(cfg, steps, batch):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(cfg.optimizer, 100)
    shardings = state_shardings(optimizer, mesh, *trees.boxed_trees(cfg, CONFIG))
    loss_fn = {"dpo": dpo.loss_fn, "reward": reward.loss_fn}[cfg.method](cfg, CONFIG)
    step = compile_train_step(loss_fn, optimizer, mesh, shardings, microbatches=1)
    params, frozen = _trees(cfg)
    state = init_state(params, optimizer, 0, frozen)
    before = jax.device_get(state)
    history = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
    return before, jax.device_get(state), history


def test_dpo_updates_raise_the_margin():
    cfg = _cfg("dpo", dpo=dict(reference="online", beta=0.5), optimizer=dict(lr=3e-3, warmup_steps=0))
    _, _, history = _train(cfg, 6, _pairs())
    margins = [float(m["rewards/margins"]) for m in history]
    assert margins[0] == 0.0 and margins[-1] > 0.05
    assert float(history[-1]["loss"]) < math.log(2) - 0.01


def test_lora_trains_only_the_adapters_and_the_reference_is_the_base():
    cfg = _cfg("dpo", dpo=dict(reference="online"), lora=dict(rank=4), optimizer=dict(lr=3e-3, warmup_steps=0))
    before, after, history = _train(cfg, 3, _pairs())
    assert set(after.params) == {"lora"} and set(after.frozen) == {"base"}
    jax.tree.map(np.testing.assert_array_equal, after.frozen, before.frozen)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after.params, before.params))
    assert all(changed)
    # The optimizer holds moments for the adapters only.
    moment_sizes = sum(x.size for x in jax.tree.leaves(after.opt_state) if x.ndim)
    assert moment_sizes == 2 * sum(x.size for x in jax.tree.leaves(after.params))
    assert float(history[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(history[-1]["rewards/margins"]) > 0.0


def test_ipo_reads_per_token_averages_and_sft_weight_adds_the_chosen_nll():
    ipo = _cfg("dpo", dpo=dict(reference="online", loss_type="ipo", beta=0.25))
    params, frozen = _trees(ipo)
    batch = _pairs()
    moved = jax.tree.map(lambda w: w * 1.05, params)
    loss, _ = _loss(dpo.loss_fn(ipo, CONFIG), moved, frozen, batch)
    policy, counts = (np.asarray(x, np.float64) for x in response_logps(CONFIG, moved["model"], batch))
    reference = np.asarray(response_logps(CONFIG, frozen["reference"], batch)[0], np.float64)
    h = (policy / counts - reference / counts) @ np.asarray([1.0, -1.0])
    assert loss == pytest.approx(np.mean((h - 1 / (2 * 0.25)) ** 2), rel=1e-5)

    plain = _cfg("dpo", dpo=dict(reference="online"))
    weighted = _cfg("dpo", dpo=dict(reference="online", sft_weight=0.5))
    base_loss, _ = _loss(dpo.loss_fn(plain, CONFIG), moved, frozen, batch)
    weighted_loss, _ = _loss(dpo.loss_fn(weighted, CONFIG), moved, frozen, batch)
    assert weighted_loss == pytest.approx(base_loss + 0.5 * np.mean(-policy[:, 0] / counts[:, 0]), rel=1e-5)
