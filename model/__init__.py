"""Decoder-only Transformer: config, pure forward function, KV cache, sharding, HF import."""

from model.config import ModelConfig, PRESETS, flops_per_token, get_config, param_counts, shape_for_params
from model.hf import from_hf
from model.transformer import (
    abstract_params,
    decode_step,
    forward,
    head_weights,
    hidden_states,
    init_cache,
    init_params,
    output_logits,
    param_specs,
    prefill,
)

__all__ = [
    "ModelConfig", "PRESETS", "get_config", "param_counts", "flops_per_token", "shape_for_params",
    "forward", "hidden_states", "output_logits", "head_weights", "init_params", "abstract_params", "param_specs", "init_cache", "prefill", "decode_step", "from_hf",
]
