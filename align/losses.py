"""Preference losses as pure functions of log-probabilities and rewards, one value per example.

Inputs are [B] sequence log-probs (from `sequence_logps`) or scalar rewards; outputs are float32
[B] losses, which the update steps sum over the micro-batch. Rewards returned for reporting are
stop_gradient'ed. Dimension letters as in `model/transformer.py`: B batch, T length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """DPO and its variants -> (losses, chosen_rewards, rejected_rewards), each [B].

    With h = (pc - pr) - (rc - rr), the policy's log-ratio margin over the reference's, and
    eps = label_smoothing (the assumed probability that a preference label is flipped):

        sigmoid  -(1 - eps) log σ(β h) - eps log σ(-β h)             (Rafailov et al.; cDPO)
        robust   (-(1 - eps) log σ(β h) + eps log σ(-β h)) / (1 - 2 eps)   (Chowdhury et al.)
        hinge    relu(1 - β h)                                         (SLiC)
        ipo      (h - 1 / (2 β))^2                                     (Azar et al.)

    eps is used by sigmoid and robust only. IPO's target margin assumes per-token averaged
    log-probs, so for ipo the caller passes `sequence_logps(..., average=True)`.
    Rewards: chosen = β (pc - rc), rejected = β (pr - rr), without gradient.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        # At eps = 0.5 the labels carry no information (and robust divides by zero).
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    rc, rr = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
    h = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * jax.lax.stop_gradient(pc - rc)
    rejected_rewards = beta * jax.lax.stop_gradient(pr - rr)
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps,
    ref_logps,
    policy_kl_logps,
    ref_kl_logps,
    labels,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    valid=None,
):
    """KTO (Ethayarajh et al. 2024, as TRL implements it) -> (losses, rewards, kl).

    The reference point z0 = max(0, mean_B(policy_kl_logps - ref_kl_logps)), estimated from
    mismatched prompt/completion pairs and held without gradient. It is a mean over the rows
    passed in: in a train step, the micro-batch (the global micro-batch under data parallelism,
    which a jit'ed function over a sharded batch computes as written), as TRL estimates it per
    accumulation step. So each of train.microbatches = k micro-batches has its own z0, and the
    update is not exactly that of one batch k times as large. With r = policy_logps - ref_logps:

        desirable   (label 1)  desirable_weight   * (1 - σ(β (r - z0)))
        undesirable (label 0)  undesirable_weight * (1 - σ(β (z0 - r)))

    labels are float {0, 1}; rewards = β r without gradient; kl is the scalar z0. `valid` [B]
    (1 for rows of data, 0 for rows that only fill a batch) keeps filler out of the mean.
    """
    valid = jnp.ones_like(_f32(labels)) if valid is None else _f32(valid)
    kl_terms = (_f32(policy_kl_logps) - _f32(ref_kl_logps)) * valid
    kl = jnp.maximum(jnp.sum(kl_terms) / jnp.maximum(jnp.sum(valid), 1.0), 0.0)
    kl = jax.lax.stop_gradient(kl)
    logratio = _f32(policy_logps) - _f32(ref_logps)
    labels = _f32(labels)
    desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (logratio - kl)))
    undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - logratio)))
    losses = labels * desirable + (1 - labels) * undesirable
    return losses, beta * jax.lax.stop_gradient(logratio), kl


def bradley_terry_loss(rewards_chosen, rewards_rejected, *, margin=None, center_coeff: float = 0.0):
    """Reward-model pair loss [B]: -log σ(r_c - r_r - margin) + center_coeff (r_c + r_r)^2.

    `margin` (scalar or [B]; None means 0) asks for a larger gap on pairs rated further apart
    (Llama 2); the centering term keeps rewards near zero mean (Eisenstein et al. 2023).
    """
    r_c, r_r = _f32(rewards_chosen), _f32(rewards_rejected)
    gap = r_c - r_r if margin is None else r_c - r_r - _f32(margin)
    return -jax.nn.log_sigmoid(gap) + center_coeff * (r_c + r_r) ** 2


def sequence_logps(token_logps_BT, loss_mask_BT, *, average: bool = False):
    """Sum over the masked tokens of each row -> [B]; with `average`, their mean (0 for a row
    with no masked token)."""
    mask_BT = _f32(loss_mask_BT)
    # where, not a product: a padded position may hold -inf, and 0 * -inf is nan.
    total_B = jnp.sum(jnp.where(mask_BT > 0, _f32(token_logps_BT), 0.0) * mask_BT, axis=-1)
    if not average:
        return total_B
    return total_B / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
