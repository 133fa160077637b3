"""Decoder-only Transformer: config, pure forward function, KV cache, sharding, HF import."""

from model.config import ModelConfig, PRESETS, flops_per_token, get_config, param_counts, shape_for_params
from model.hf import from_hf
from model.transformer import (
    decode_step,
    forward,
    init_cache,
    init_params,
    param_specs,
    prefill,
)

__all__ = [
    "ModelConfig", "PRESETS", "get_config", "param_counts", "flops_per_token", "shape_for_params",
    "forward", "init_params", "param_specs", "init_cache", "prefill", "decode_step", "from_hf",
]
