"""Figures of a post-training run: loss, held-out task accuracy, and preference margins."""

from __future__ import annotations

from etils import epath

from train.metrics import read_metrics

# (metric in metrics.jsonl, panel title); panels without data are left out.
_PANELS = (
    (("loss", "eval_loss"), "loss"),
    (("eval_accuracy",), "held-out task accuracy (greedy)"),
    (("rewards/margins", "eval_rewards/margins", "margin", "eval_margin"), "reward margin (chosen - rejected)"),
    (("rewards/accuracies", "eval_rewards/accuracies", "pairwise_accuracy", "eval_pairwise_accuracy"), "pairwise accuracy"),
)


def with_kto_margins(row: dict) -> dict:
    """`row` with KTO's reward margins (desirable - undesirable), which it logs as class means."""
    for prefix in ("", "eval_"):
        if f"{prefix}rewards/desirable" in row:
            row = {**row, f"{prefix}rewards/margins": row[f"{prefix}rewards/desirable"] - row[f"{prefix}rewards/undesirable"]}
    return row


def plot_run(metrics_path: epath.Path, out_path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [with_kto_margins(row) for row in read_metrics(metrics_path)]
    panels = []
    for keys, title in _PANELS:
        series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((title, series))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for key, points in series.items():
            steps, values = zip(*points)
            style = "o-" if key.startswith("eval_") else "-"
            ax.plot(steps, values, style, lw=1.5, ms=4, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with epath.Path(out_path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
