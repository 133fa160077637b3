"""Train state: trainable and frozen trees, optimizer state, step, RNG; its shardings.

Every training method fills the same state. `params` is what the optimizer updates (the
model in pretraining and full fine-tuning, LoRA adapters, a reward model with its head);
`frozen` holds trees the loss reads but never changes (a DPO reference policy, the base
weights under LoRA). Each tree is described by a *boxed abstract tree*: `jax.eval_shape` of a
Flax init, whose leaves carry shapes and logical axis names, so shardings follow the trees.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import model
from model import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_steps: jax.Array  # updates skipped because the loss or gradients were not finite
    frozen: dict = flax.struct.field(default_factory=dict)


def init_state(params, optimizer: optax.GradientTransformation, seed: int, frozen=None) -> TrainState:
    """A state at step 0 around given trees (pure: jit it with `out_shardings`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        frozen={} if frozen is None else frozen,
    )


def tree_shardings(boxed, mesh: Mesh):
    """NamedShardings of a boxed abstract tree, by its logical axis names."""
    return sharding.param_shardings(nn.get_partition_spec(boxed), mesh)


def state_shardings(optimizer, mesh: Mesh, params_boxed, frozen_boxed=None) -> TrainState:
    """Trainable and frozen trees and the optimizer moments follow the logical-axis rules;
    scalars are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = tree_shardings(params_boxed, mesh)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, 0), nn.meta.unbox(params_boxed))
    opt_state = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=replicated, params=params, opt_state=opt_state, rng=replicated,
        nonfinite_steps=replicated, frozen=tree_shardings(frozen_boxed or {}, mesh),
    )


def abstract_state(optimizer, mesh: Mesh, params_boxed, frozen_boxed=None) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto the mesh."""
    shapes = jax.eval_shape(
        lambda p, f: init_state(p, optimizer, 0, f),
        nn.meta.unbox(params_boxed), nn.meta.unbox(frozen_boxed or {}),
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes, state_shardings(optimizer, mesh, params_boxed, frozen_boxed),
    )


def create_state(config: model.ModelConfig, optimizer, mesh: Mesh, seed: int, params=None) -> TrainState:
    """A fresh state, created directly in its shards (no full copy on one device): of the
    given `params` (imported weights), else of a model the seed's first half initializes."""
    init_key, state_seed = jax.random.split(jax.random.key(seed))

    def create(params):
        if params is None:
            params = model.init_params(config, init_key)
        return init_state(params, optimizer, 0).replace(rng=jax.random.key_data(state_seed))

    shardings = state_shardings(optimizer, mesh, model.abstract_params(config))
    return jax.jit(create, out_shardings=shardings)(params)
