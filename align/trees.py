"""What a post-training state holds, by method: the trees that train and the trees held fixed.

    params["model"]        the policy (or reward model) when it trains in full
    params["lora"]         LoRA adapters, when `lora.rank > 0`; then frozen["base"] holds the
                           weights they adapt, and the reference policy is the base alone
    params["score"]        the reward model's scalar head: w [D], b []
    params["value"]        PPO's value head on the policy's hidden states: w [D], b [] (zero)
    frozen["reference"]    the reference policy of DPO (online), KTO, PPO and GRPO without LoRA
    frozen["normalization"] the reward model's mean and std on a reference set
    frozen["kl_coef"]      PPO's KL coefficient (the adaptive controller changes it)

Each tree is given boxed (shapes plus logical axis names), as `train.state` expects.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import model
from align import lora

METHODS = ("sft", "dpo", "kto", "reward", "ppo", "grpo")


def uses_lora(cfg) -> bool:
    return cfg.lora.rank > 0


def online_reference(cfg) -> bool:
    """Whether the method runs a frozen reference policy itself (KTO, PPO, GRPO, online DPO)."""
    return cfg.method in ("kto", "ppo", "grpo") or (cfg.method == "dpo" and cfg.dpo.reference == "online")


def score_head(d_model: int, key) -> dict:
    """The reward head, boxed: w ~ N(0, 1/D) over the hidden state, b = 0."""
    w = jax.random.normal(key, (d_model,), jnp.float32) / jnp.sqrt(d_model)
    return {"w": nn.Partitioned(w, names=("embed",)), "b": jnp.zeros((), jnp.float32)}


def trees(cfg, model_config: model.ModelConfig, policy_params, key):
    """(params, frozen) at the start of a run around the starting policy's weights, boxed
    where the trees are new (adapters, head). Traced by `jax.eval_shape` with the model's
    abstract parameters, it gives the abstract trees that restore a checkpoint."""
    params, frozen = {}, {}
    lora_key, score_key = jax.random.split(key)
    if uses_lora(cfg):
        params["lora"] = lora.init_adapters(
            model_config, lora_key, rank=cfg.lora.rank, targets=cfg.lora.targets
        )
        frozen["base"] = policy_params
    else:
        params["model"] = policy_params
        if online_reference(cfg):
            frozen["reference"] = jax.tree.map(jnp.copy, policy_params)
    if cfg.method == "reward":
        params["score"] = score_head(model_config.d_model, score_key)
        frozen["normalization"] = {"mean": jnp.zeros((), jnp.float32), "std": jnp.ones((), jnp.float32)}
    if cfg.method == "ppo":
        params["value"] = {
            "w": nn.Partitioned(jnp.zeros((model_config.d_model,), jnp.float32), names=("embed",)),
            "b": jnp.zeros((), jnp.float32),
        }
        frozen["kl_coef"] = jnp.asarray(cfg.rl.kl_coef, jnp.float32)
    return params, frozen


def boxed_trees(cfg, model_config: model.ModelConfig):
    """Boxed abstract (params, frozen) of a run with this config."""
    return jax.eval_shape(
        lambda base, key: trees(cfg, model_config, base, key),
        model.abstract_params(model_config), jax.random.key(0),
    )


def policy(cfg, params, frozen):
    """The transformer weights the loss runs: the trained model, or base + adapters."""
    if uses_lora(cfg):
        return lora.apply(frozen["base"], params["lora"], alpha=cfg.lora.alpha, rank=cfg.lora.rank)
    return params["model"]


def reference(cfg, params, frozen):
    """The frozen reference policy: the base weights under LoRA (adapters off)."""
    del params
    return frozen["base"] if uses_lora(cfg) else frozen["reference"]
