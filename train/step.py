"""The compiled update and evaluation: pure functions of (state, batch), for any loss.

A training method supplies a loss function

    loss_fn(params, frozen, batch, rng) -> LossOutput(objective, weight, metrics)

returning sums over the examples of one micro-batch: the objective to differentiate, the
weight it is a sum over (tokens for language modeling, pairs for DPO) and metric sums. The step
accumulates gradients and sums over micro-batches and divides once by the total weight, so
k micro-batches give exactly the update of the one big batch; an update whose objective or
gradients are not finite is skipped and counted. Batches are dicts of arrays whose leading
axis is the batch, sharded over the mesh's data axes whatever their keys and ranks.

Language modeling: a batch holds int32 [B, T] arrays `inputs`, `targets`, `segment_ids` (0 marks
padding) and `positions`, and optionally `loss_mask` (which targets count; by default every
real token). Logits, softmax and loss are float32 whatever the compute dtype; with
`train.loss_chunk` the head and loss run on that many positions at a time.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import model
from model import sharding
from model.logprobs import target_logprobs
from train.state import TrainState, state_shardings


class LossOutput(NamedTuple):
    objective: jax.Array  # summed over the micro-batch's examples; differentiated
    weight: jax.Array  # what `objective` sums over; the update divides by its total
    metrics: dict  # sums over the micro-batch, reported divided by the total weight (a Ratio by its own)


class Ratio(NamedTuple):
    """A metric that is a mean over some of the examples (one class of them, say): its sum
    and its own weight, each summed over the micro-batches, reported as their quotient (NaN
    when no example of the step had weight)."""

    total: jax.Array
    weight: jax.Array


def reported(metric_sums: dict, weight) -> dict:
    """The metrics of summed `LossOutput.metrics`: each sum over the total weight, a Ratio's
    over its own."""
    return {
        name: value.total / value.weight if isinstance(value, Ratio) else value / weight
        for name, value in metric_sums.items()
    }


LossFn = Callable[..., LossOutput]


def token_losses(config: model.ModelConfig, params, batch, z_loss: float = 0.0, chunk: int = 0):
    """Sums over the loss mask: (cross-entropy + z-loss, cross-entropy, token count). The
    head runs on `chunk` positions at a time (`model.logprobs`; 0: all at once)."""
    hidden_BTD = model.hidden_states(
        config, params, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )
    logp_BT, log_z_BT = target_logprobs(config, params, hidden_BTD, batch["targets"], chunk=chunk)
    mask = batch["loss_mask"] if "loss_mask" in batch else batch["segment_ids"] > 0
    mask_BT = mask.astype(jnp.float32)
    ce_sum = -jnp.sum(logp_BT * mask_BT)
    total = ce_sum
    if z_loss:
        # PaLM's auxiliary loss keeps log Z (the softmax normalizer) near zero.
        total = total + z_loss * jnp.sum(log_z_BT**2 * mask_BT)
    return total, ce_sum, jnp.sum(mask_BT)


def language_model_loss(config: model.ModelConfig, z_loss: float = 0.0, chunk: int = 0) -> LossFn:
    """Next-token cross-entropy per masked token (pretraining and SFT)."""

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        total, ce_sum, count = token_losses(config, params, batch, z_loss, chunk)
        return LossOutput(total, count, {"loss": ce_sum})

    return loss_fn


def _split_microbatches(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, loss_fn: LossFn, optimizer, microbatches: int):
    """One optimizer update over `microbatches` accumulated micro-batches."""
    rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def objective(params, micro, key):
        out = loss_fn(params, state.frozen, micro, key)
        return out.objective, (out.objective, out.weight, out.metrics)

    grad_fn = jax.grad(objective, has_aux=True)
    micro_batches = _split_microbatches(batch, microbatches)
    keys = jax.random.split(step_key, microbatches)

    def accumulate(carry, inputs):
        g, sums = grad_fn(state.params, *inputs)
        return jax.tree.map(jnp.add, carry, (g, sums)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    sums_shape = jax.eval_shape(
        lambda *args: tuple(loss_fn(*args)), state.params, state.frozen, first, keys[0]
    )
    zeros = (
        jax.tree.map(jnp.zeros_like, state.params),
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape),
    )
    (grads, (objective_sum, weight, metric_sums)), _ = jax.lax.scan(
        accumulate, zeros, (micro_batches, keys)
    )
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(objective_sum) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A step whose loss or gradient is not finite leaves parameters and optimizer state as they
    # were. Under a cond the update writes into the donated buffers, where a select after it
    # would hold old and new copies of both at once.
    params, opt_state = jax.lax.cond(
        finite, update, lambda params, opt_state: (params, opt_state), state.params, state.opt_state
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(rng),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    )
    metrics = reported(metric_sums, weight)
    metrics.update(
        grad_norm=grad_norm, weight=weight, finite=finite, nonfinite_steps=new_state.nonfinite_steps
    )
    return new_state, metrics


def eval_step(params, frozen, batch, *, loss_fn: LossFn):
    """The weight and metric sums of one batch (to be summed over an evaluation set)."""
    out = loss_fn(params, frozen, batch, jax.random.key(0))
    return {"weight": out.weight, **out.metrics}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis over the data axes; applies to every array of a batch."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch",)))


def compile_train_step(loss_fn: LossFn, optimizer, mesh: Mesh, shardings: TrainState, *, microbatches: int):
    """jit the update with explicit shardings, the state donated."""
    return jax.jit(
        functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, microbatches=microbatches),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def compile_eval_step(loss_fn: LossFn, mesh: Mesh, params_shardings, frozen_shardings=None):
    """jit `(params, frozen, batch) -> sums` with the given shardings of the two trees."""
    return jax.jit(
        functools.partial(eval_step, loss_fn=loss_fn),
        in_shardings=(params_shardings, frozen_shardings or {}, batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def compile_steps(
    config: model.ModelConfig, optimizer, mesh: Mesh, *, microbatches: int, z_loss: float, loss_chunk: int = 0
):
    """Pretraining's update and evaluation (`(params, frozen, batch) -> {"weight", "loss"}`,
    summed cross-entropy without the z-loss)."""
    shardings = state_shardings(optimizer, mesh, model.abstract_params(config))
    train = compile_train_step(
        language_model_loss(config, z_loss, loss_chunk), optimizer, mesh, shardings, microbatches=microbatches
    )
    evaluate = compile_eval_step(language_model_loss(config, chunk=loss_chunk), mesh, shardings.params)
    return train, evaluate
