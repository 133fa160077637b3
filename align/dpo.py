"""Direct preference optimization and its variants (sigmoid, robust, hinge, IPO).

A batch holds preference pairs as [B, 2, T] arrays (index 0 chosen, 1 rejected), which go
through the policy in one forward pass of 2B rows. The reference log-probs come from the
frozen reference run in the step (`dpo.reference='online'`), from a cache computed once before
training (`'cached'`, the batch's `reference_logps` [B, 2]), or are zero (`'none'`). With LoRA
the reference is the base weights with the adapters off. The weight of a micro-batch is its
number of pairs, so every metric is a mean over pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import model
from align import trees
from align.logprobs import response_logps
from align.losses import dpo_loss
from train.step import LossOutput

__all__ = ["dpo_loss", "loss_fn", "reference_logps"]


def reference_logps(cfg, model_config: model.ModelConfig, params, frozen, batch):
    """Summed reference log-probs [B, 2] of the batch's responses, as the loss uses them."""
    if cfg.dpo.reference == "cached":
        return batch["reference_logps"]
    if cfg.dpo.reference == "none":
        return jnp.zeros(batch["inputs"].shape[:2], jnp.float32)
    reference = trees.reference(cfg, params, frozen)
    logps, _ = response_logps(model_config, reference, batch, cfg.train.loss_chunk)
    return jax.lax.stop_gradient(logps)


def loss_fn(cfg, model_config: model.ModelConfig):
    d = cfg.dpo

    def fn(params, frozen, batch, rng):
        del rng
        policy = trees.policy(cfg, params, frozen)
        logps_B2, counts_B2 = response_logps(model_config, policy, batch, cfg.train.loss_chunk)
        ref_B2 = reference_logps(cfg, model_config, params, frozen, batch)
        if d.loss_type == "ipo":  # IPO's margin is between per-token averages
            policy_in, ref_in = logps_B2 / jnp.maximum(counts_B2, 1.0), ref_B2 / jnp.maximum(counts_B2, 1.0)
        else:
            policy_in, ref_in = logps_B2, ref_B2
        losses_B, chosen_B, rejected_B = dpo_loss(
            policy_in[:, 0], policy_in[:, 1], ref_in[:, 0], ref_in[:, 1],
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
        )
        valid_B = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(losses_B)
        objective_B = losses_B
        if d.sft_weight:
            nll_B = -logps_B2[:, 0] / jnp.maximum(counts_B2[:, 0], 1.0)
            objective_B = objective_B + d.sft_weight * nll_B
        total = lambda x: jnp.sum(x * valid_B)
        metrics = {
            "loss": total(objective_B),
            "rewards/chosen": total(chosen_B),
            "rewards/rejected": total(rejected_B),
            "rewards/accuracies": total((chosen_B > rejected_B).astype(jnp.float32)),
            "rewards/margins": total(chosen_B - rejected_B),
            "logps/chosen": total(logps_B2[:, 0]),
            "logps/rejected": total(logps_B2[:, 1]),
        }
        return LossOutput(total(objective_B), jnp.sum(valid_B), metrics)

    return fn
