"""The chunked head and loss (`model.logprobs`) equal the whole-sequence ones, in values and
gradients, and never hold the [B, T, V] float32 logits at once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import sharding
from model.logprobs import target_logprobs
from train.step import token_losses
from tests.model.test_transformer import assert_vocabulary_matmuls_take_bfloat16
from tests.train.test_step import CONFIG, _batch


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [4, 5, 16])  # 5 does not divide T = 16; 16 is one piece
def test_chunked_loss_and_gradients_equal_the_whole_sequence(tied, chunk):
    config = CONFIG.replace(tie_embeddings=tied)
    params = model.init_params(config, jax.random.key(0))
    batch = _batch()
    batch["loss_mask"] = (batch["segment_ids"] == 2).astype(np.int32)

    def loss(params, chunk):
        total, ce_sum, count = token_losses(config, params, batch, z_loss=1e-3, chunk=chunk)
        return total / count, (ce_sum, count)

    (whole, (ce_whole, count_whole)), grads_whole = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (chunked, (ce_chunked, count_chunked)), grads_chunked = jax.value_and_grad(loss, has_aux=True)(params, chunk)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(ce_chunked, ce_whole, rtol=1e-6)
    assert count_chunked == count_whole == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), grads_chunked, grads_whole)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_target_logprobs_against_float64_log_softmax(dtype):
    config = CONFIG.replace(dtype=dtype)
    params = model.init_params(config, jax.random.key(1))
    batch = _batch(seed=2)
    hidden = model.hidden_states(config, params, batch["inputs"], segment_ids=batch["segment_ids"])
    logp, log_z = target_logprobs(config, params, hidden, batch["targets"], chunk=3, temperature=0.7)
    assert logp.dtype == log_z.dtype == jnp.float32
    logits = np.asarray(model.forward(config, params, batch["inputs"], segment_ids=batch["segment_ids"]), np.float64) / 0.7
    expected_log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - expected_log_z
    np.testing.assert_allclose(log_z, expected_log_z, rtol=1e-5)
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_target_logprobs_gradients_equal_autodiff_of_log_softmax(temperature):
    """The hand-written backward pass of the log-softmax at the targets equals autodiff of
    `jax.nn.log_softmax` over `model.forward`'s logits, through log p and log Z both, over a
    padded vocabulary (1000 ids stored as 1024)."""
    config = CONFIG.replace(vocab_size=1000)
    params = model.init_params(config, jax.random.key(7))
    rng = np.random.default_rng(8)
    hidden = jnp.asarray(rng.normal(size=(4, 6, config.d_model)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 1000, size=(4, 6)), jnp.int32)
    w_logp, w_log_z = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(2))

    def fused(hidden, head, config=config):
        logp, log_z = target_logprobs(config, {"head": head}, hidden, targets, temperature=temperature)
        return jnp.sum(w_logp * logp + w_log_z * log_z)

    def autodiff(hidden, head):
        logits = model.output_logits(config, head, hidden)[..., :1000] / temperature
        log_z = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(w_logp * logp + w_log_z * log_z)

    got, want = (jax.value_and_grad(f, (0, 1))(hidden, params["head"]) for f in (fused, autodiff))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    np.testing.assert_array_equal(got[1][1][1000:], 0.0)

    # In bfloat16 compute the head's backward matmuls take the logit gradient in bfloat16.
    bfloat16 = config.replace(dtype="bfloat16")
    grad = jax.grad(lambda h, w: fused(h.astype(jnp.bfloat16), w, bfloat16), (0, 1))
    assert_vocabulary_matmuls_take_bfloat16(jax.jit(grad).lower(hidden, params["head"]).as_text(), 1024)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_over_a_padded_vocabulary_is_the_log_softmax_over_the_real_ids(tied):
    """Vocabulary 1000, stored as 1024 rows whose padding would win every softmax were it not
    masked: log-probs and log Z (whole and chunked), loss and z-loss equal a float64
    log-softmax over the first 1000 columns, and no gradient reaches the padded rows."""
    config = CONFIG.replace(vocab_size=1000, tie_embeddings=tied)
    table = "embedding" if tied else "head"
    params = model.init_params(config, jax.random.key(3))
    loud = jax.random.normal(jax.random.key(4), (24, config.d_model)) * 10.0  # logits ~ +-80
    params = {**params, table: params[table].at[1000:].set(loud)}
    batch = _batch(seed=5)
    tokens = np.random.default_rng(6).integers(0, 1000, size=(8, 17)).astype(np.int32)
    batch["inputs"], batch["targets"] = tokens[:, :-1], tokens[:, 1:]
    hidden = model.hidden_states(config, params, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    logits = np.asarray(hidden, np.float64) @ np.asarray(params[table], np.float64)[:1000].T
    top = logits.max(-1)
    expected_log_z = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    expected = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - expected_log_z
    mask = batch["segment_ids"] > 0
    for chunk in (0, 5):
        logp, log_z = target_logprobs(config, params, hidden, batch["targets"], chunk=chunk)
        np.testing.assert_allclose(log_z, expected_log_z, rtol=1e-5)
        np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
    loss = lambda p: token_losses(config, p, batch, z_loss=1e-3, chunk=5)[:2]  # (loss, cross-entropy)
    (total, ce_sum), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(ce_sum, -expected[mask].sum(), rtol=1e-5)
    np.testing.assert_allclose(total, ce_sum + 1e-3 * (expected_log_z[mask] ** 2).sum(), rtol=1e-5)
    np.testing.assert_array_equal(grads[table][1000:], 0.0)
    assert np.all(np.isfinite(grads[table])) and np.abs(grads[table][:1000]).sum() > 0


def test_chunked_loss_never_holds_the_whole_logits():
    # A vocabulary large beside the model, as in Llama 3 (128k tokens, d_model 2048 to 4096).
    config = model.ModelConfig(vocab_size=32_768, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=256)
    params = model.init_params(config, jax.random.key(0))
    B, T = 2, 256
    batch = {
        "inputs": jnp.ones((B, T), jnp.int32), "targets": jnp.ones((B, T), jnp.int32),
        "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
    }

    def temporaries(chunk):
        grad = jax.jit(jax.grad(lambda p: token_losses(config, p, batch, chunk=chunk)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = B * T * config.vocab_size * 4
    assert temporaries(0) > logits_bytes  # today's path: the logits and their gradient
    assert temporaries(32) < logits_bytes / 2  # a [B, 32, V] piece and its gradient, the head gradient


def test_chunked_response_logps_of_pairs_equal_the_whole_sequence():
    from align.logprobs import response_logps

    params = model.init_params(CONFIG, jax.random.key(2))
    rows = _batch(seed=4)
    rows["loss_mask"] = (rows["segment_ids"] == 2).astype(np.int32)
    pairs = {k: v.reshape(4, 2, -1) for k, v in rows.items()}
    whole, counts = response_logps(CONFIG, params, pairs)
    chunked, chunked_counts = response_logps(CONFIG, params, pairs, chunk=6)
    assert whole.shape == (4, 2)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_array_equal(chunked_counts, counts)
