"""AdamW with global-norm clipping and the learning-rate schedules researchers use."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at
    `total_steps`; or warmup-stable-decay (WSD): constant, then linear decay over the final
    `decay_fraction` of the run."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    warmup_fn = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, rest)
    elif cfg.schedule == "wsd":
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        stable = max(rest - decay_steps, 0)
        decay = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)], [stable]
        )
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
    return optax.join_schedules([warmup_fn, decay], [warmup])


def applied_learning_rate(
    schedule: optax.Schedule, step: int, nonfinite_updates: int, finite: bool, updates_per_step: int = 1
) -> float:
    """The learning rate the first update of `step` (counted from 1) applied, 0 when an update
    of the step was skipped. A skipped update leaves the optimizer state as it was, the
    schedule's count included (as optax.apply_if_finite does), so each of the
    `nonfinite_updates` so far puts the schedule one update behind."""
    # A Python int: a NumPy count would be a new argument type for the schedule's ops, each
    # compiled anew (0.2 s).
    return float(schedule(int((step - 1) * updates_per_step - nonfinite_updates))) if finite else 0.0


def weight_decay_mask(params):
    """Decay matrices (kernels and embeddings); not norm scales, biases or scalars (the bias
    `b` of a reward or value head). Decided by name, since layer stacking gives norm scales two
    dimensions too."""

    def decays(path, leaf):
        name = path[-1].key
        return not (name == "scale" or name == "bias" or name.endswith("_bias") or getattr(leaf, "ndim", None) == 0)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=weight_decay_mask,
        ),
    )
