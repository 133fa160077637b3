"""LoRA adapters on the model's dense kernels, applied in weight space.

A selected kernel W, its leading axes split into inputs I and outputs O (q/k/v: D -> (N|K, H);
o: (N, H) -> D; up/gate: D -> F; down: F -> D), gets A [(L,) I, r] and B [(L,) r, O], and the
model runs with W + (alpha / r) * reshape(A @ B). B starts at zero, so training starts from
the base model exactly. `apply` builds the adapted parameters inside the compiled loss, so
the model code stays untouched and gradients reach only A and B when the base is held fixed;
the same function merges the adapters for export.

There is no LoRA dropout: it drops the adapter's *input* activations, which a merged weight
cannot express.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

import model
from model.config import ModelConfig

ATTENTION_TARGETS = r"attn/(q|k|v|o)$"
DENSE_TARGETS = r"(attn/(q|k|v|o)|mlp/(up|gate|down))$"

# Number of leading (input) axes of each adaptable kernel, after the layers axis if scanned.
_INPUT_AXES = {
    "attn/q": 1, "attn/k": 1, "attn/v": 1, "attn/o": 2,
    "mlp/up": 1, "mlp/gate": 1, "mlp/down": 1,
}


def _flatten(tree, prefix=""):
    """(path, leaf) pairs of a nested dict, paths '/'-joined."""
    for name, sub in tree.items():
        if isinstance(sub, Mapping):
            yield from _flatten(sub, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", sub


def _kernel_name(path: str) -> str:
    return "/".join(path.split("/")[-2:])


def target_paths(config: ModelConfig, targets: str) -> list[str]:
    """Parameter paths `targets` selects (regular expression searched in each path)."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"LoRA targets {targets!r} is not a regular expression: {e}") from e
    all_paths = [path for path, _ in _flatten(model.abstract_params(config))]
    paths = [path for path in all_paths if pattern.search(path)]
    if not paths:
        raise ValueError(f"LoRA targets {targets!r} match no parameter; the parameters are {all_paths}")
    not_kernels = [path for path in paths if _kernel_name(path) not in _INPUT_AXES]
    if not_kernels:
        raise ValueError(
            f"LoRA targets {targets!r} match parameters that are not dense kernels: {not_kernels}; "
            f"adaptable kernels end in {sorted(_INPUT_AXES)}"
        )
    return paths


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def init_adapters(config: ModelConfig, rng, *, rank: int, targets: str = ATTENTION_TARGETS):
    """Adapters for the kernels `targets` selects: a nested dict mirroring their paths, each
    {"a": A, "b": B}, boxed with logical axis names (`nn.get_partition_spec` of its
    `jax.eval_shape` gives shardings, `nn.meta.unbox` the values).

    A is sharded like the kernel's first input axis and B like its first output axis (a
    row-major flattening keeps that axis's blocks contiguous); the rank axis is replicated.
    A is Kaiming-uniform as in loralib and PEFT (bound 1/sqrt(I)), B zero. Both are float32
    whatever the base dtype: they are small, and their updates would vanish in bfloat16.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    paths = target_paths(config, targets)
    kernels = dict(_flatten(model.abstract_params(config)))
    adapters = {}
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        kernel = kernels[path]
        n_lead = 1 if kernel.names[0] == "layers" else 0
        n_in = _INPUT_AXES[_kernel_name(path)]
        shape, names = kernel.value.shape, kernel.names
        lead_shape, lead_names = shape[:n_lead], names[:n_lead]
        I, O = math.prod(shape[n_lead:n_lead + n_in]), math.prod(shape[n_lead + n_in:])
        a_names = (*lead_names, names[n_lead], None)
        b_names = (*lead_names, None, names[n_lead + n_in])
        a_init = nn.with_logical_partitioning(_uniform(1 / math.sqrt(I)), a_names)
        b_init = nn.with_logical_partitioning(nn.initializers.zeros, b_names)
        a = a_init(key, (*lead_shape, I, rank), jnp.float32)
        b = b_init(key, (*lead_shape, rank, O), jnp.float32)
        node = adapters
        for name in path.split("/"):
            node = node.setdefault(name, {})
        node.update(a=a, b=b)
    return adapters


def _is_adapter(node) -> bool:
    return "a" in node and not isinstance(node["a"], Mapping)


def _adapted(w, adapter, scale):
    # HIGHEST: on TPU a default float32 matmul runs in bfloat16 passes.
    delta = jnp.matmul(
        adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def apply(params, adapters, *, alpha: float, rank: int):
    """`params` with each adapted kernel replaced by W + (alpha / rank) * reshape(A @ B) in
    W's dtype (A @ B in float32); every other leaf is passed through as is. Used inside the
    loss, and equally to merge trained adapters into the weights for export."""
    scale = alpha / rank

    def merge(params_node, adapters_node, prefix):
        merged = dict(params_node)
        for name, sub in adapters_node.items():
            if _is_adapter(sub):
                if sub["a"].shape[-1] != rank:
                    raise ValueError(f"LoRA adapter {prefix}{name} has rank {sub['a'].shape[-1]}, not {rank}")
                merged[name] = _adapted(params_node[name], sub, scale)
            else:
                merged[name] = merge(params_node[name], sub, f"{prefix}{name}/")
        return merged

    return merge(params, adapters, "")


def adapter_count(adapters) -> int:
    """Number of trainable adapter parameters (boxed or not)."""
    return sum(x.size for x in jax.tree.leaves(adapters))
