"""PPO and GRPO as pure functions of per-token log-probs, values, rewards and masks.

No training loop here: these are the pieces a rollout-then-update step composes, each
jit-able (string options are static) and float32. Dimension letters as in
`model/transformer.py`: B rollouts, T response tokens, V vocab.

`mask_BT` (bool or 0/1 float) marks the real response tokens of each row: a prefix of the row,
padding after it. Padded positions may hold anything, even nan or inf: every function reads
them through `jnp.where`, so nothing leaks into real positions or into gradients.

Log-probs must come from one distribution throughout: `model.generate` returns each sampled
token's log-prob under log_softmax(logits / temperature), and `model.logprobs.target_logprobs`
scores the same distribution when given the same `temperature`. Scoring the policy at another
temperature than it sampled at makes the PPO ratio differ from 1 before any update.

KL estimators (Schulman, "Approximating KL divergence", 2020), with r = logp - ref_logp for
tokens sampled from the policy, each an estimate of KL(policy || ref):
    k1 = r                      unbiased, high variance, can be negative
    k2 = r^2 / 2                biased, low variance, >= 0
    k3 = (exp(-r) - 1) + r      unbiased, low variance, >= 0
k3 is DeepSeekMath's GRPO term ref/π - log(ref/π) - 1, the same expression. Where each is used:
  * PPO (`ppo_rewards`, InstructGPT / TRL): the KL is a *reward*, held without gradient; it
    reaches the policy through the advantages, a score-function gradient. TRL's default is k1:
    E_π[k1 ∇log π] = ∇ KL(π||ref), the reverse KL's gradient.
  * GRPO (`grpo_loss`, DeepSeekMath): k3 is a *loss* term differentiated through logp with the
    samples held fixed. On-policy, E_π[∇k3] = E_π[(1 - ref/π) ∇log π] = ∇ KL(ref||π): the
    *forward* KL's gradient, which agrees with the reverse KL's only to first order (π near
    ref). Differentiated the same way, E_π[∇k1] = 0 and E_π[∇k2] = ∇ KL(π||ref).
  The tests check these four expected gradients exactly on a categorical distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_SCALES = ("std", "none")
GRPO_AGGREGATIONS = ("token", "sequence", "dr_grpo")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _live(mask):
    return _f32(mask) > 0


def _zeroed(x, live):
    """x as float32 with padded entries 0: applied to inputs, so that a nan or inf there
    reaches neither the value nor the gradient (a single `where` after exp(inf) would pass
    0 · inf = nan back)."""
    return jnp.where(live, _f32(x), 0.0)


def masked_mean(x, mask, axis=None):
    """sum(x · mask) / sum(mask) over `axis` (all axes when None); 0 where the mask is empty.

    `mask` is 0/1 (or bool) and broadcasts against x; masked-out entries of x are never read.
    """
    live = jnp.broadcast_to(_live(mask), jnp.shape(x))
    total = jnp.sum(_zeroed(x, live), axis=axis)
    count = jnp.sum(live, axis=axis, dtype=jnp.float32)
    return total / jnp.maximum(count, 1.0)


def masked_var(x, mask, *, unbiased: bool = True):
    """Variance of the masked entries of x (all axes), with Bessel's correction n / (n - 1)
    when `unbiased` (as TRL's `masked_var`); 0 for fewer than two entries."""
    live = jnp.broadcast_to(_live(mask), jnp.shape(x))
    centered = jnp.where(live, _zeroed(x, live) - masked_mean(x, live), 0.0)
    count = jnp.sum(live, dtype=jnp.float32)
    dof = count - 1.0 if unbiased else count
    return jnp.sum(centered**2) / jnp.maximum(dof, 1.0)


def masked_whiten(x, mask, shift_mean: bool = True, *, unbiased: bool = True):
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the whole array (TRL's
    `masked_whiten`), with the unbiased (Bessel-corrected) variance by default, so the result
    has masked mean 0 and sample variance 1. With `shift_mean=False` the mean is added back
    (TRL whitens rewards this way: scale only). Padded positions come out 0."""
    live = jnp.broadcast_to(_live(mask), jnp.shape(x))
    mean = masked_mean(x, live)
    var = masked_var(x, live, unbiased=unbiased)
    whitened = (_zeroed(x, live) - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(live, whitened, 0.0)


def compute_gae(rewards_BT, values_BT, mask_BT, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) -> (advantages_BT, returns_BT).

        δ_t = r_t + γ V_{t+1} - V_t,      A_t = δ_t + γ λ A_{t+1}

    computed by a reverse `lax.scan` over T. The episode ends at the response's last real
    token: V and A after it are 0, so that token's δ is r_t - V_t. returns = A + V at real
    positions. Padded positions get advantage 0 and return 0. `gamma` and `lam` may be traced.
    """
    live_BT = _live(mask_BT)
    rewards_BT = _zeroed(rewards_BT, live_BT)
    values_BT = _zeroed(values_BT, live_BT)
    next_values_BT = jnp.pad(values_BT[:, 1:], ((0, 0), (0, 1)))  # 0 after the last real token
    deltas_BT = rewards_BT + gamma * next_values_BT - values_BT

    def step(next_advantage_B, xs):
        delta_B, live_B = xs
        advantage_B = jnp.where(live_B, delta_B + gamma * lam * next_advantage_B, 0.0)
        return advantage_B, advantage_B

    _, advantages_TB = jax.lax.scan(
        step, jnp.zeros(rewards_BT.shape[:1], jnp.float32), (deltas_BT.T, live_BT.T), reverse=True
    )
    advantages_BT = advantages_TB.T
    returns_BT = jnp.where(live_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT


def kl_penalty(logp_BT, ref_logp_BT, estimator: str = "k1"):
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy, with
    r = logp - ref_logp: k1 = r, k2 = r^2 / 2, k3 = (exp(-r) - 1) + r (see the module
    docstring for which estimator is used where and what its gradient is)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    r = _f32(logp_BT) - _f32(ref_logp_BT)
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r**2
    return jnp.expm1(-r) + r


def ppo_rewards(
    scores_B,
    logp_BT,
    ref_logp_BT,
    mask_BT,
    *,
    kl_coef,
    estimator: str = "k1",
    missing_eos_penalty=None,
    ended_with_eos_B=None,
):
    """Per-token PPO rewards (InstructGPT, TRL) -> (rewards_BT, kl_BT), without gradient.

        reward_t = -kl_coef · kl_t  +  [t is the row's last real token] · score

    kl_t is `kl_penalty(logp, ref_logp, estimator)`. With `missing_eos_penalty`, rows whose
    response did not end with EOS (`ended_with_eos_B` False) score `score - missing_eos_penalty`.
    Both are 0 at padded positions; a row with no real token gets no score.
    """
    live_BT = _live(mask_BT)
    scores_B = _f32(scores_B)
    if missing_eos_penalty is not None:
        if ended_with_eos_B is None:
            raise ValueError("ppo_rewards: missing_eos_penalty needs ended_with_eos_B")
        scores_B = jnp.where(jnp.asarray(ended_with_eos_B, bool), scores_B, scores_B - missing_eos_penalty)
    kl_BT = kl_penalty(_zeroed(logp_BT, live_BT), _zeroed(ref_logp_BT, live_BT), estimator)
    lengths_B = jnp.sum(live_BT, axis=-1)
    last_BT = jnp.arange(live_BT.shape[-1])[None, :] == (lengths_B - 1)[:, None]
    rewards_BT = -kl_coef * kl_BT + jnp.where(last_BT, scores_B[:, None], 0.0)
    return jax.lax.stop_gradient(rewards_BT), jax.lax.stop_gradient(kl_BT)


def adaptive_kl_coef(coef, current_kl, n_steps, target, horizon):
    """Adaptive KL controller (Ziegler et al. 2019) as a pure update -> the new coefficient:

        e = clip(current_kl / target - 1, -0.2, 0.2),   coef · (1 + e · n_steps / horizon)

    `n_steps` is the number of samples (rollouts) since the last update, as in TRL.
    """
    error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
    return _f32(coef) * (1.0 + error * n_steps / horizon)


def _clipped_surrogate(logp_BT, old_logp_BT, advantages_BT, live_BT, eps_low, eps_high):
    """Per-token max(-A ρ, -A clip(ρ, 1 - eps_low, 1 + eps_high)), whether the clipped term is
    strictly the larger, ρ and log ρ; padded positions as if logp = old_logp and A = 0."""
    log_ratio_BT = _zeroed(logp_BT, live_BT) - jax.lax.stop_gradient(_zeroed(old_logp_BT, live_BT))
    ratio_BT = jnp.exp(log_ratio_BT)
    advantages_BT = jax.lax.stop_gradient(_zeroed(advantages_BT, live_BT))
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT, ratio_BT, log_ratio_BT


def ppo_policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, *, clip_eps):
    """PPO's clipped surrogate (Schulman et al. 2017, as TRL) -> (loss, metrics).

    With ρ = exp(logp - old_logp) and advantages A (held without gradient):

        loss = masked_mean(max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)))

    metrics (no gradient): clipfrac, the fraction of tokens where the clipped term is strictly
    the larger (TRL's `(pg_losses2 > pg_losses)`); approxkl = 0.5 · masked_mean((log ρ)^2);
    ratio, the masked mean of ρ.
    """
    losses_BT, clipped_BT, ratio_BT, log_ratio_BT = _clipped_surrogate(
        logp_BT, old_logp_BT, advantages_BT, _live(mask_BT), clip_eps, clip_eps
    )
    metrics = {
        "clipfrac": masked_mean(clipped_BT, mask_BT),
        "approxkl": 0.5 * masked_mean(log_ratio_BT**2, mask_BT),
        "ratio": masked_mean(ratio_BT, mask_BT),
    }
    return masked_mean(losses_BT, mask_BT), jax.lax.stop_gradient(metrics)


def ppo_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, *, clip_eps_value):
    """Clipped value loss (as TRL) -> (loss, metrics).

        v_clip = old + clip(v - old, -ε, ε)
        loss = 0.5 · masked_mean(max((v - R)^2, (v_clip - R)^2))

    metrics: clipfrac, the fraction of tokens where the clipped term is strictly the larger.
    """
    live_BT = _live(mask_BT)
    values_BT = _zeroed(values_BT, live_BT)
    old_values_BT = jax.lax.stop_gradient(_zeroed(old_values_BT, live_BT))
    returns_BT = jax.lax.stop_gradient(_zeroed(returns_BT, live_BT))
    clipped_values_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps_value, clip_eps_value)
    unclipped_BT = (values_BT - returns_BT) ** 2
    clipped_BT = (clipped_values_BT - returns_BT) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
    return loss, jax.lax.stop_gradient({"clipfrac": masked_mean(clipped_BT > unclipped_BT, mask_BT)})


def entropy_from_logits(logits_BTV):
    """Entropy -Σ_v p log p of softmax(logits) over the last axis, float32; -inf logits
    (filtered tokens) contribute 0, with finite gradients. The mean over response tokens is
    `masked_mean(entropy_from_logits(logits_BTV), mask_BT)`. It needs the whole [B, T, V]
    logits: for a large vocabulary call it on chunks of positions."""
    logp_BTV = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
    p_BTV = jnp.exp(logp_BTV)
    return -jnp.sum(p_BTV * jnp.where(p_BTV > 0, logp_BTV, 0.0), axis=-1)


def grpo_advantages(rewards_B, group_size: int, *, scale: str = "std", eps: float = 1e-4):
    """Group-relative advantages -> [B]; rows are consecutive groups of `group_size` samples of
    one prompt.

        std   (r - mean_group) / (std_group + eps)     GRPO (Shao et al. 2024)
        none  r - mean_group                           Dr. GRPO (Liu et al. 2025)

    std_group is the sample standard deviation (Bessel-corrected, as TRL's `torch.std`): for
    rewards [1, 0, 0, 1] it is sqrt(1/3), not 0.5. A group of equal rewards gets advantages 0.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown GRPO scale {scale!r}; expected one of {GRPO_SCALES}")
    rewards_B = _f32(rewards_B)
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"grpo_advantages: {rewards_B.shape[0]} rewards are not groups of {group_size}")
    rewards_NG = rewards_B.reshape(-1, group_size)
    centered_NG = rewards_NG - jnp.mean(rewards_NG, axis=-1, keepdims=True)
    if scale == "std":
        std_N1 = jnp.sqrt(jnp.sum(centered_NG**2, axis=-1, keepdims=True) / max(group_size - 1, 1))
        centered_NG = centered_NG / (std_N1 + eps)
    return centered_NG.reshape(-1)


def zero_variance_fraction(rewards_B, group_size: int):
    """Fraction of groups whose rewards are all equal (they carry no GRPO signal)."""
    rewards_NG = _f32(rewards_B).reshape(-1, group_size)
    return jnp.mean(jnp.max(rewards_NG, axis=-1) == jnp.min(rewards_NG, axis=-1), dtype=jnp.float32)


def grpo_loss(
    logp_BT,
    old_logp_BT,
    ref_logp_BT,
    advantages_B,
    mask_BT,
    *,
    clip_eps,
    kl_coef,
    aggregation: str = "token",
    clip_eps_high=None,
    max_len: int | None = None,
):
    """GRPO's loss (Shao et al. 2024) -> (loss, metrics).

    Per token, with ρ = exp(logp - old_logp), each row's advantage A broadcast over its tokens,
    and k3 = exp(ref - logp) - (ref - logp) - 1 (module docstring):

        ℓ_t = max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε_high)) + kl_coef · k3_t

    ε_high defaults to ε (DAPO's clip-higher sets it larger). Aggregated over real tokens:

        token     Σ_{b,t} ℓ / Σ_{b,t} mask                (DAPO; TRL "bnpo")
        sequence  mean_b(Σ_t ℓ / Σ_t mask)                (original GRPO)
        dr_grpo   Σ_{b,t} ℓ / (B · max_len)               (Dr. GRPO; max_len defaults to T)

    "token" and "dr_grpo" sum over the batch given: under gradient accumulation the caller
    weights micro-batches by their token count (resp. rows). `ref_logp_BT` may be None when
    kl_coef is 0. metrics (no gradient): kl (masked mean of k3), clipfrac, ratio.
    """
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"unknown GRPO aggregation {aggregation!r}; expected one of {GRPO_AGGREGATIONS}")
    live_BT = _live(mask_BT)
    advantages_BT = jnp.broadcast_to(_f32(advantages_B)[:, None], live_BT.shape)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    losses_BT, clipped_BT, ratio_BT, _ = _clipped_surrogate(
        logp_BT, old_logp_BT, advantages_BT, live_BT, clip_eps, eps_high
    )
    if ref_logp_BT is None:
        kl_BT = jnp.zeros_like(losses_BT)
    else:
        ref_logp_BT = jax.lax.stop_gradient(_zeroed(ref_logp_BT, live_BT))
        kl_BT = kl_penalty(_zeroed(logp_BT, live_BT), ref_logp_BT, "k3")
        losses_BT = losses_BT + kl_coef * kl_BT
    losses_BT = jnp.where(live_BT, losses_BT, 0.0)
    if aggregation == "token":
        loss = jnp.sum(losses_BT) / jnp.maximum(jnp.sum(live_BT, dtype=jnp.float32), 1.0)
    elif aggregation == "sequence":
        loss = jnp.mean(masked_mean(losses_BT, live_BT, axis=-1))
    else:
        B, T = live_BT.shape
        loss = jnp.sum(losses_BT) / (B * (T if max_len is None else max_len))
    metrics = {
        "kl": masked_mean(kl_BT, live_BT),
        "clipfrac": masked_mean(clipped_BT, live_BT),
        "ratio": masked_mean(ratio_BT, live_BT),
    }
    return loss, jax.lax.stop_gradient(metrics)
