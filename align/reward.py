"""A Bradley-Terry reward model: the transformer with a scalar head on the hidden state of
each sequence's last real token (left or right padding alike).

Loss per pair: -log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2, the
second term centering rewards near 0. After training, the rewards of a reference set (the eval
pairs) give a mean and std that `normalized_rewards` uses; they are stored in the checkpoint.
"""

from __future__ import annotations

import jax.numpy as jnp

import model
from align import trees
from align.losses import bradley_terry_loss
from train.step import LossOutput


def last_token_index(segment_ids_BT):
    """Index of the last real (segment id > 0) token of each row."""
    T = segment_ids_BT.shape[-1]
    real_BT = segment_ids_BT > 0
    return T - 1 - jnp.argmax(real_BT[..., ::-1], axis=-1)


def rewards(cfg, model_config: model.ModelConfig, params, frozen, batch):
    """Raw rewards [...] for rows [..., T] of `inputs`, `segment_ids`, `positions`."""
    return head_rewards(model_config, trees.policy(cfg, params, frozen), params["score"], batch)


def head_rewards(model_config: model.ModelConfig, model_params, score, batch):
    """Raw rewards [...] of the transformer `model_params` with the scalar head `score`."""
    lead = batch["inputs"].shape[:-1]
    flat = lambda key: batch[key].reshape(-1, batch[key].shape[-1])
    hidden_BTD = model.hidden_states(
        model_config, model_params, flat("inputs"), segment_ids=flat("segment_ids"), positions=flat("positions"),
    )
    last_B = last_token_index(flat("segment_ids"))
    hidden_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    rewards_B = hidden_BD.astype(jnp.float32) @ score["w"] + score["b"]
    return rewards_B.reshape(lead)


def flops_per_token(model_config: model.ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: the language model's (`model.flops_per_token`) without the
    vocabulary head, which the scalar head on one token per row replaces."""
    return model.flops_per_token(model_config, seq_len)["total"] - 6 * model_config.vocab_size * model_config.d_model


def normalized_rewards(cfg, model_config, params, frozen, batch):
    """Rewards with the reference set's mean 0 and std 1."""
    norm = frozen["normalization"]
    return (rewards(cfg, model_config, params, frozen, batch) - norm["mean"]) / norm["std"]


def loss_fn(cfg, model_config: model.ModelConfig):
    r = cfg.reward

    def fn(params, frozen, batch, rng):
        del rng
        rewards_B2 = rewards(cfg, model_config, params, frozen, batch)
        chosen_B, rejected_B = rewards_B2[:, 0], rewards_B2[:, 1]
        losses_B = bradley_terry_loss(chosen_B, rejected_B, margin=r.margin, center_coeff=r.center_coeff)
        valid_B = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(losses_B)
        total = lambda x: jnp.sum(x * valid_B)
        n = jnp.sum(valid_B)
        mean = jnp.sum(rewards_B2 * valid_B[:, None]) / jnp.maximum(2 * n, 1.0)
        variance = jnp.sum((rewards_B2 - mean) ** 2 * valid_B[:, None]) / jnp.maximum(2 * n, 1.0)
        metrics = {
            "loss": total(losses_B),
            "pairwise_accuracy": total((chosen_B > rejected_B).astype(jnp.float32)),
            "margin": total(chosen_B - rejected_B),
            "rewards/chosen": total(chosen_B),
            "rewards/rejected": total(rejected_B),
            # Within the micro-batch, times its pairs: the step's division gives their mean.
            "rewards/std": jnp.sqrt(variance) * n,
        }
        return LossOutput(total(losses_B), n, metrics)

    return fn
