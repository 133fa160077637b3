"""The train step: accumulation, sharding, non-finite handling, optimizer pieces."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import model
from model import sharding
from train import optimizer as optim
from train.state import create_state, init_state
from train.step import LossOutput, compile_steps, token_losses, train_step

CONFIG = model.ModelConfig(
    vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
)
OPT = ml_collections.ConfigDict(dict(
    lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, schedule="cosine", decay_fraction=0.2,
    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
))


def _batch(batch_size=8, seq_len=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 128, size=(batch_size, seq_len + 1)).astype(np.int32)
    # Two documents per row of random lengths, then padding: token counts differ per row.
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        a, b = sorted(rng.choice(np.arange(1, seq_len), size=2, replace=False))
        segment_ids[row, :a], segment_ids[row, a:b] = 1, 2
    positions = np.zeros_like(segment_ids)
    for row in range(batch_size):
        for seg in (1, 2):
            idx = np.flatnonzero(segment_ids[row] == seg)
            positions[row, idx] = np.arange(len(idx))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions}


def _mesh(shape):
    return sharding.make_mesh(shape, devices=jax.devices()[: np.prod(shape)], model_config=CONFIG)


def _run(mesh_shape, microbatches, steps=3, batch=None):
    mesh = _mesh(mesh_shape)
    tx = optim.make_optimizer(OPT, total_steps=10)
    train, _ = compile_steps(CONFIG, tx, mesh, microbatches=microbatches, z_loss=1e-4)
    state = create_state(CONFIG, tx, mesh, seed=0)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(steps):
            state, metrics = train(state, batch or _batch(seed=i))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_loss_is_the_mean_over_real_tokens():
    params = model.init_params(CONFIG, jax.random.key(0))
    batch = _batch()
    _, ce_sum, count = token_losses(CONFIG, params, batch)
    logits = np.asarray(model.forward(CONFIG, params, batch["inputs"], segment_ids=batch["segment_ids"]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    mask = batch["segment_ids"] > 0
    assert int(count) == mask.sum()
    np.testing.assert_allclose(float(ce_sum) / float(count), nll[mask].mean(), rtol=1e-5)


@pytest.fixture(scope="module")
def single_device_big_batch():
    return _run((1, 1, 1), microbatches=1)


def test_gradient_accumulation_equals_one_big_batch(single_device_big_batch):
    big, params_big = single_device_big_batch
    accumulated, params_acc = _run((1, 1, 1), microbatches=4)
    np.testing.assert_allclose(accumulated, big, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), params_acc, params_big)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_training_matches_single_device(single_device_big_batch, mesh_shape):
    single, params_single = single_device_big_batch
    sharded, params_sharded = _run(mesh_shape, microbatches=2)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), params_sharded, params_single)


def test_loss_decreases_on_a_repeated_batch():
    losses, _ = _run((1, 1, 1), microbatches=1, steps=8, batch=_batch(seed=3))
    assert losses[-1] < 0.8 * losses[0]


def test_nonfinite_update_is_skipped_and_counted():
    mesh = _mesh((1, 1, 1))
    tx = optim.make_optimizer(OPT, total_steps=10)
    train, _ = compile_steps(CONFIG, tx, mesh, microbatches=1, z_loss=1e-4)
    state = create_state(CONFIG, tx, mesh, seed=0)
    poisoned = state.replace(params={**state.params, "embedding": state.params["embedding"].at[5].set(jnp.nan)})
    before, opt_before = jax.device_get((poisoned.params, poisoned.opt_state))
    batch = _batch()
    batch["inputs"][0, 0] = 5
    new_state, metrics = train(poisoned, batch)
    assert not bool(metrics["finite"]) and int(new_state.nonfinite_steps) == 1
    assert int(new_state.step) == 1
    after = jax.device_get(new_state.params)
    np.testing.assert_array_equal(after["head"], before["head"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.opt_state), opt_before)


def _sign_adam(total_updates):
    """(jitted update, state, schedule) of one scalar parameter under Adam with b1 = b2 = 0,
    whose update is the gradient's sign: the parameter moves by exactly the learning rate. A
    batch {"poison": [True]} makes the update non-finite."""
    cfg = ml_collections.ConfigDict(dict(OPT, lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="linear",
                                         b1=0.0, b2=0.0, eps=1e-30, weight_decay=0.0, clip_norm=0.0))
    tx = optim.make_optimizer(cfg, total_steps=total_updates)

    def loss_fn(params, frozen, batch, rng):
        objective = params["w"] * jnp.where(batch["poison"][0], jnp.nan, 1.0)
        return LossOutput(objective, jnp.float32(1.0), {})

    update = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=tx, microbatches=1))
    state = init_state({"w": jnp.float32(0.0)}, tx, seed=0)
    return update, state, optim.learning_rate_schedule(cfg, total_steps=total_updates)


def test_the_logged_learning_rate_is_the_one_each_update_applied():
    """The second update is non-finite and skipped."""
    update, state, schedule = _sign_adam(10)
    logged, moved = [], []
    for step, poison in enumerate([False, True, False, False], start=1):
        w = float(state.params["w"])
        state, metrics = update(state, {"poison": np.array([poison])})
        moved.append(w - float(state.params["w"]))
        logged.append(optim.applied_learning_rate(schedule, step, int(metrics["nonfinite_steps"]), bool(metrics["finite"])))
    np.testing.assert_allclose(moved, [1.0, 0.0, 0.9, 0.8], atol=1e-6)
    np.testing.assert_allclose(logged, moved, atol=1e-6)


def test_the_logged_learning_rate_counts_updates_when_a_step_makes_several():
    """Online RL makes several updates per step (epochs x minibatches) on a schedule over
    updates: with two per step and the third update skipped, each step logs the rate its first
    update applied, and the step holding the skipped one logs 0."""
    update, state, schedule = _sign_adam(8)
    logged, first_moves = [], []
    for step, poisons in enumerate([(False, False), (True, False), (False, False), (False, False)], start=1):
        finite = True
        for i, poison in enumerate(poisons):
            w = float(state.params["w"])
            state, metrics = update(state, {"poison": np.array([poison])})
            finite &= bool(metrics["finite"])
            if i == 0:
                first_moves.append(w - float(state.params["w"]))
        logged.append(optim.applied_learning_rate(schedule, step, int(state.nonfinite_steps), finite, updates_per_step=2))
    np.testing.assert_allclose(first_moves, [1.0, 0.0, 0.625, 0.375], atol=1e-6)
    np.testing.assert_allclose(logged, first_moves, atol=1e-6)


def test_weight_decay_skips_norms_and_biases():
    params = {"layers": {"attn_norm": {"scale": 0}, "attn": {"q": 0, "q_bias": 0}}, "embedding": 0, "final_norm": {"scale": 0, "bias": 0},
              "score": {"w": np.zeros(4), "b": np.float32(0)}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"layers": {"attn_norm": {"scale": False}, "attn": {"q": True, "q_bias": False}}, "embedding": True, "final_norm": {"scale": False, "bias": False},
                    "score": {"w": True, "b": False}}


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1}),
        ("linear", {10: 1.0, 55: 0.55, 100: 0.1}),
        ("wsd", {10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 100: 0.1}),
    ],
)
def test_schedules(schedule, expected):
    cfg = ml_collections.ConfigDict(dict(OPT, lr=1.0, warmup_steps=10, schedule=schedule, decay_fraction=0.2))
    fn = optim.learning_rate_schedule(cfg, total_steps=100)
    for step, value in expected.items():
        assert float(fn(step)) == pytest.approx(value, abs=1e-6), step
