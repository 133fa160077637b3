"""Logical axis names -> mesh axes: the one table, the mesh, and parameter shardings.

Every parameter and large activation is annotated with logical axis names (see the
letters in `model/transformer.py`). `RULES` maps them onto the mesh axes `data`, `fsdp`,
`tensor`; resolution is first match wins, and a mesh axis is used at most once per array
(so an activation's `embed` stays unsharded because `batch` already took `fsdp`).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
    ("norm", None),
    ("max_len", None),
)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Any]]):
    """Use `rules` instead of `RULES` for the activations and parameters traced inside."""
    with nn.logical_axis_rules(rules):
        yield


def current_rules() -> tuple[tuple[str, Any], ...]:
    return tuple(nn.get_logical_axis_rules()) or RULES


def logical_to_spec(axes: Sequence[str | None], rules=None) -> PartitionSpec:
    """Resolve logical axis names to a PartitionSpec (first matching rule wins)."""
    return nn.logical_to_mesh_axes(tuple(axes), rules or current_rules())


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is set (one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def mesh_shape(shape: dict[str, int] | Sequence[int], n_devices: int) -> dict[str, int]:
    """Resolve a (data, fsdp, tensor) shape, where one entry may be -1 (the rest)."""
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
        shape = [shape.get(name, 1) for name in MESH_AXES]
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: sizes must be positive or -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices are not divisible by the fixed axes {shape}")
        shape[shape.index(-1)] = n_devices // known
    named = dict(zip(MESH_AXES, shape))
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh: {named} needs {math.prod(shape)} devices, but there are {n_devices}")
    return named


def host_values(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process, also when other hosts hold some of its shards."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def max_over_processes(value: int) -> int:
    """The largest of every process's `value`; with several processes, every one must call it."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.process_allgather(np.int32(value)).max())


def make_mesh(
    shape: dict[str, int] | Sequence[int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
    model_config=None,
) -> Mesh:
    """Build a (data, fsdp, tensor) mesh; one entry may be -1, meaning the remaining devices.

    With `model_config`, refuses dimensions the mesh cannot divide evenly.
    """
    devices = list(jax.devices() if devices is None else devices)
    named = mesh_shape(shape, len(devices))
    if model_config is not None:
        check_divisible(model_config, named)
    device_grid = np.asarray(devices).reshape([named[a] for a in MESH_AXES])
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# The config field behind each logical parameter dimension, for error messages.
_CONFIG_FIELDS = {
    "vocab": "padded_vocab_size", "embed": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "head_dim": "head_dim", "mlp": "d_ff", "max_len": "max_seq_len", "norm": "d_model",
    "layers": "n_layers",
}


def check_divisible(config, mesh_shape: dict[str, int], rules=None) -> None:
    """Raise if a parameter dimension is not divisible by the mesh axes the rules give it."""
    from model.transformer import param_specs

    for spec in jax.tree.leaves(param_specs(config), is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name, mesh_axes in zip(spec, logical_to_spec(spec, rules)):
            if mesh_axes is None:
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            size = math.prod(mesh_shape[a] for a in mesh_axes)
            field = _CONFIG_FIELDS[name]
            value = getattr(config, field)
            if value % size:
                raise ValueError(
                    f"model.{field}={value} is not divisible by the {'x'.join(mesh_axes)!r} "
                    f"mesh axis of size {size} (logical axis {name!r})"
                )


def param_shardings(logical_specs, mesh: Mesh, rules=None):
    """NamedSharding tree for a tree of logical PartitionSpecs (see `model.param_specs`)."""
    rules = rules or current_rules()
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def initialize_distributed() -> None:
    """Join a multi-host job (TPU pod or multi-node GPU); a no-op for a single process.

    On TPU VMs jax discovers the coordinator itself; on GPU clusters set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM).
    jax reads the address itself but not the other two, so they are passed on here. A driver
    that runs several stages calls it once per stage: after the first it does nothing.
    """
    multi_host = (
        "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0
    )
    if multi_host and not jax.distributed.is_initialized():
        given = lambda name: int(os.environ[name]) if name in os.environ else None
        jax.distributed.initialize(num_processes=given("JAX_NUM_PROCESSES"), process_id=given("JAX_PROCESS_ID"))
