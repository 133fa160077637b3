"""Train state (params, optimizer state, step, RNG), its shardings and its creation."""

from __future__ import annotations

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


def _create(config: model.ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    init_key, state_key = jax.random.split(jax.random.key(seed))
    params = model.init_params(config, init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(state_key),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def state_shardings(config: model.ModelConfig, optimizer, mesh: Mesh) -> TrainState:
    """Parameters and their optimizer moments follow the logical-axis rules; scalars are
    replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = sharding.param_shardings(model.param_specs(config), mesh)
    abstract = jax.eval_shape(lambda: _create(config, optimizer, 0))
    opt_state = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=replicated, params=params, opt_state=opt_state, rng=replicated,
        nonfinite_steps=replicated,
    )


def create_state(config: model.ModelConfig, optimizer, mesh: Mesh, seed: int) -> TrainState:
    """Initialize the state directly in its shards (no full copy on one device)."""
    shardings = state_shardings(config, optimizer, mesh)
    return jax.jit(lambda: _create(config, optimizer, seed), out_shardings=shardings)()


def abstract_state(config: model.ModelConfig, optimizer, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto the mesh."""
    shapes = jax.eval_shape(lambda: _create(config, optimizer, 0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes, state_shardings(config, optimizer, mesh),
    )
