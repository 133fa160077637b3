"""Kahneman-Tversky optimization (Ethayarajh et al. 2024) on unpaired responses labelled
desirable or undesirable.

A batch holds [B, 2, T] rows: index 0 is (prompt i, completion i), index 1 the mismatched
(prompt i, completion i+1) whose policy/reference log-ratio, averaged over the micro-batch (the
global micro-batch under data parallelism), estimates the reference point z0, as TRL does per
accumulation step. So with train.microbatches = k each micro-batch has its own z0, and the
update is not exactly that of one batch k times as large. The reference policy is frozen (the
base under LoRA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import model
from align import trees
from align.logprobs import response_logps
from align.losses import kto_loss
from train.step import LossOutput, Ratio


def loss_fn(cfg, model_config: model.ModelConfig):
    k = cfg.kto

    def fn(params, frozen, batch, rng):
        del rng
        policy, reference = trees.policy(cfg, params, frozen), trees.reference(cfg, params, frozen)
        logps_B2, _ = response_logps(model_config, policy, batch, cfg.train.loss_chunk)
        ref_B2, _ = response_logps(model_config, reference, batch, cfg.train.loss_chunk)
        ref_B2 = jax.lax.stop_gradient(ref_B2)
        labels_B = batch["label"].astype(jnp.float32)
        valid_B = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(labels_B)
        losses_B, rewards_B, kl = kto_loss(
            logps_B2[:, 0], ref_B2[:, 0], logps_B2[:, 1], ref_B2[:, 1], labels_B,
            beta=k.beta, desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
            valid=valid_B,
        )
        n = jnp.sum(valid_B)
        desirable, undesirable = labels_B * valid_B, (1 - labels_B) * valid_B
        total = jnp.sum(losses_B * valid_B)
        metrics = {
            "loss": total, "kl": kl * n,
            # Each class's mean over the step, however its examples fall into micro-batches.
            "rewards/desirable": Ratio(jnp.sum(rewards_B * desirable), jnp.sum(desirable)),
            "rewards/undesirable": Ratio(jnp.sum(rewards_B * undesirable), jnp.sum(undesirable)),
        }
        return LossOutput(total, n, metrics)

    return fn
