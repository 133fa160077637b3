"""The compiled train and eval steps: pure functions of (state, batch).

A batch holds int32 [B, T] arrays `inputs`, `targets`, `segment_ids` (0 marks padding) and
`positions`. The loss is averaged over real tokens (segment id > 0); logits, softmax and
loss are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

import model
from model import sharding
from train.state import TrainState, state_shardings

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def token_losses(config: model.ModelConfig, params, batch, z_loss: float = 0.0):
    """Sums over real tokens: (cross-entropy + z-loss, cross-entropy, token count)."""
    logits_BTV = model.forward(
        config, params, batch["inputs"],
        segment_ids=batch["segment_ids"], positions=batch["positions"],
    )
    mask_BT = (batch["segment_ids"] > 0).astype(jnp.float32)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    ce_sum = jnp.sum(ce_BT * mask_BT)
    total = ce_sum
    if z_loss:
        # PaLM's auxiliary loss keeps log Z (the softmax normalizer) near zero.
        log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
        total = total + z_loss * jnp.sum(log_z_BT**2 * mask_BT)
    return total, ce_sum, jnp.sum(mask_BT)


def _split_microbatches(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, config, optimizer, microbatches: int, z_loss: float):
    """One optimizer update over `microbatches` accumulated micro-batches.

    Gradients of summed token losses are accumulated and divided by the total token count
    once, so k micro-batches give exactly the gradient of the one big batch. An update
    whose loss or gradients are not finite is skipped and counted.
    """

    def summed_loss(params, micro):
        total, ce_sum, count = token_losses(config, params, micro, z_loss)
        return total, (ce_sum, count)

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, ce_sum, count = carry
        g, (c, n) = grad_fn(state.params, micro)
        return (jax.tree.map(jnp.add, grads, g), ce_sum + c, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, ce_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0), _split_microbatches(batch, microbatches)
    )
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = ce_sum / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite,
        "nonfinite_steps": new_state.nonfinite_steps,
    }
    return new_state, metrics


def eval_step(params, batch, *, config):
    """Summed cross-entropy and real-token count of one batch."""
    _, ce_sum, count = token_losses(config, params, batch)
    return {"loss_sum": ce_sum, "tokens": count}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))


def compile_steps(config: model.ModelConfig, optimizer, mesh: Mesh, *, microbatches: int, z_loss: float):
    """jit the train step (state donated) and the eval step with explicit shardings."""
    state_sh = state_shardings(config, optimizer, mesh)
    data_sh = {key: batch_sharding(mesh) for key in BATCH_KEYS}
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    train = jax.jit(
        functools.partial(
            train_step, config=config, optimizer=optimizer, microbatches=microbatches, z_loss=z_loss
        ),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, config=config),
        in_shardings=(state_sh.params, data_sh),
        out_shardings=replicated,
    )
    return train, evaluate
