"""Sweep planning: the runs (model size, tokens) of an IsoFLOP or an N x D sweep.

Model shapes come from a callable `shape_of(target_params) -> Shape`, so the planner does
not depend on the model package (there, `model.config.shape_for_params`, `param_counts`
and `flops_per_token` provide it). The tokens of an IsoFLOP run follow from its budget,
D = C / (FLOPs per token), under one of three accountings:

  "model"        the model's own count: 6 x matmul parameters + attention (PaLM appx. B)
  "6n"           6 x total parameters (Hoffmann et al.)
  "6n_nonembed"  6 x non-embedding parameters (Kaplan et al.)

They change the fitted exponents (the embedding share and the attention share shrink with
size), so every run records its C under all three: `flops_model`, `flops_6n`,
`flops_6n_nonembed`, next to `flops`, the C of the accounting that was planned with.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

ACCOUNTINGS = ("model", "6n", "6n_nonembed")


class Shape(NamedTuple):
    n_params: int
    n_params_nonembed: int
    flops_per_token: float  # the model's own count ("model" accounting)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str
    target_params: float
    n_params: int
    n_params_nonembed: int
    tokens: int
    steps: int
    flops: float  # C under the planning accounting
    flops_model: float
    flops_6n: float
    flops_6n_nonembed: float
    budget: float | None  # the IsoFLOP budget this run belongs to; None in an N x D grid


def flops_per_token(shape: Shape, accounting: str) -> float:
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting={accounting!r}; expected one of {ACCOUNTINGS}")
    return {
        "model": shape.flops_per_token,
        "6n": 6.0 * shape.n_params,
        "6n_nonembed": 6.0 * shape.n_params_nonembed,
    }[accounting]


def plan_isoflop(
    budgets: Sequence[float],
    target_sizes: Sequence[float],
    shape_of: Callable[[float], Shape],
    *,
    tokens_per_step: int,
    accounting: str = "model",
    min_steps: int = 1,
) -> list[PlannedRun]:
    """Every (budget, size) pair: tokens D = C / FLOPs-per-token, rounded to whole steps.

    Sizes whose shape repeats one already planned at that budget are skipped, as are runs
    that would train fewer than `min_steps` steps. Rounding moves C by at most half a step,
    so a budget holds to tokens_per_step / (2 D).
    """
    runs = []
    for budget in budgets:
        seen = set()
        for target in target_sizes:
            shape = Shape(*shape_of(target))
            if shape.n_params in seen:
                continue
            seen.add(shape.n_params)
            steps = round(budget / flops_per_token(shape, accounting) / tokens_per_step)
            if steps < min_steps:
                continue
            name = f"isoflop-C{_short(budget)}-N{_short(shape.n_params)}"
            runs.append(_run(name, target, shape, steps, tokens_per_step, accounting, budget))
    return runs


def plan_grid(
    target_sizes: Sequence[float],
    token_counts: Sequence[float],
    shape_of: Callable[[float], Shape],
    *,
    tokens_per_step: int,
    accounting: str = "model",
) -> list[PlannedRun]:
    """An N x D grid: every size trained on every token count (rounded to whole steps). A
    (shape, steps) pair already planned, from another target rounding to the same shape or
    token count, is planned once."""
    runs, seen = [], set()
    for target in target_sizes:
        shape = Shape(*shape_of(target))
        for token_count in token_counts:
            steps = max(1, round(token_count / tokens_per_step))
            if (shape.n_params, steps) in seen:
                continue
            seen.add((shape.n_params, steps))
            name = f"grid-N{_short(shape.n_params)}-D{_short(steps * tokens_per_step)}"
            runs.append(_run(name, target, shape, steps, tokens_per_step, accounting, None))
    return runs


def _run(name, target, shape: Shape, steps, tokens_per_step, accounting, budget) -> PlannedRun:
    tokens = steps * tokens_per_step
    return PlannedRun(
        name=name,
        target_params=float(target),
        n_params=int(shape.n_params),
        n_params_nonembed=int(shape.n_params_nonembed),
        tokens=int(tokens),
        steps=int(steps),
        flops=flops_per_token(shape, accounting) * tokens,
        flops_model=shape.flops_per_token * tokens,
        flops_6n=6.0 * shape.n_params * tokens,
        flops_6n_nonembed=6.0 * shape.n_params_nonembed * tokens,
        budget=None if budget is None else float(budget),
    )


def _short(x: float) -> str:
    """3.21e6 -> "3.21e6", 1e15 -> "1e15": a compact, filesystem-safe number."""
    mantissa, exponent = f"{float(x):.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
