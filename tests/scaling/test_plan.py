"""The sweep planner: budgets hold under each FLOP accounting, and every run records all."""

import pytest

from experiments.scaling import plan


def _shape_of(target):
    """A stand-in for the model's shape rule: widths in steps of 64, so the sizes it returns
    miss the targets, an embedding table of 512 x d, and attention FLOPs on top of 6N."""
    d_model = max(64, round((target / 12) ** 0.5 / 64) * 64)
    n_layers = max(1, round(target / (12 * d_model**2)))
    nonembed = 12 * n_layers * d_model**2
    total = nonembed + 512 * d_model
    return total, nonembed, 6.0 * total + 12 * n_layers * d_model * 256


@pytest.mark.parametrize("accounting", plan.ACCOUNTINGS)
def test_isoflop_budgets_hold(accounting):
    budgets = [1e14, 1e15, 1e16]
    sizes = [2e5, 5e5, 1e6, 2e6, 5e6]
    runs = plan.plan_isoflop(budgets, sizes, _shape_of, tokens_per_step=2048, accounting=accounting, min_steps=20)
    assert {r.budget for r in runs} == set(budgets)
    for run in runs:
        assert run.flops == pytest.approx(run.budget, rel=0.03)
        assert run.tokens == run.steps * 2048 and run.steps >= 20
        assert run.flops == getattr(run, {"model": "flops_model", "6n": "flops_6n", "6n_nonembed": "flops_6n_nonembed"}[accounting])
        assert run.flops_6n == pytest.approx(6 * run.n_params * run.tokens)
        assert run.flops_6n_nonembed == pytest.approx(6 * run.n_params_nonembed * run.tokens)
        assert run.flops_model > run.flops_6n  # attention on top
    assert len({r.name for r in runs}) == len(runs)


def test_isoflop_skips_repeated_shapes_and_too_short_runs():
    runs = plan.plan_isoflop([1e14], [5e5, 5.1e5, 5e9], _shape_of, tokens_per_step=2048, accounting="6n", min_steps=10)
    assert len(runs) == 1  # 5.1e5 rounds to the 5e5 shape; 5e9 would train under 10 steps


def test_grid_trains_every_size_on_every_token_count():
    runs = plan.plan_grid([5e5, 2e6], [1e7, 1e8], _shape_of, tokens_per_step=1000)
    assert [(r.n_params, r.tokens) for r in runs] == [
        (runs[0].n_params, 10_000_000), (runs[0].n_params, 100_000_000),
        (runs[2].n_params, 10_000_000), (runs[2].n_params, 100_000_000),
    ]
    assert all(r.budget is None for r in runs)
    # Sizes that round to one shape, or token counts to one step count, are planned once.
    again = plan.plan_grid([5e5, 5.1e5], [1e7, 1e7 + 400], _shape_of, tokens_per_step=1000)
    assert [(r.n_params, r.tokens) for r in again] == [(runs[0].n_params, 10_000_000)]


def test_unknown_accounting_is_rejected():
    with pytest.raises(ValueError, match="accounting"):
        plan.plan_isoflop([1e14], [5e5], _shape_of, tokens_per_step=1, accounting="6nd")
