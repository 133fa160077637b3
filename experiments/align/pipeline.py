"""Post-training on arithmetic with no human data, every stage in order:

  python -m experiments.align.pipeline --workdir=runs/arithmetic [--pretrained=runs/quickstart]

1. pretraining (`experiments/quickstart.py` with digits split into single tokens, which
   arithmetic needs), unless `--pretrained` names a finished run;
2. SFT on addition and subtraction problems (`experiments/align/arithmetic.py:sft`);
3. the SFT model's own samples on training problems, scored by the exact checker, give
   preference pairs (a right answer chosen, a wrong one rejected) and KTO examples;
4. DPO with and without the SFT term, DPO with LoRA, KTO, and a reward model on those pairs;
5. PPO and GRPO from the SFT model, sampling training problems and scored by the checker; PPO
   scored by the reward model of stage 4 instead (`ppo_rm`);
6. the reward-versus-KL frontier: `ppo` and `ppo_rm` again at each of `--kl_coefs`, in
   `WORKDIR/frontier/`.

Each stage resumes or is skipped when its workdir holds a finished run. At the end it prints
the tables of held-out accuracies and of the frontier, and the SFT, PPO and GRPO models'
greedy and sampled accuracy and pass@8 on the held-out problems, and writes `summary.json`,
`accuracy.png`, `online.png` and `frontier.png`.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import numpy as np
from absl import flags

from align import online, source
from align.plots import with_kto_margins
from align import train as align_train
from align.tasks import arithmetic
from experiments import quickstart
from experiments.align import arithmetic as experiment
from model import sharding
from model.generate import generate
from train import pretrain
from train.cli import run_program
from train.metrics import read_metrics

_WORKDIR = flags.DEFINE_string("workdir", "runs/arithmetic", "Directory of every stage's run.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", "", "Pretraining workdir to start from (default: WORKDIR/pretrained, trained here)."
)
_SFT_PROBLEMS = flags.DEFINE_integer("sft_problems", 10_000, "Training problems for SFT.")
_PAIR_PROBLEMS = flags.DEFINE_integer("pair_problems", 2_000, "Training problems sampled for pairs.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per problem for pairs.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature for pairs.")
_KL_COEFS = flags.DEFINE_list(
    "kl_coefs", ["0", "0.2", "1"], "KL coefficients at which ppo and ppo_rm are rerun for the frontier."
)

log = logging.getLogger("pipeline")
_SAMPLE_BATCH = 512  # prompts per generation call
_FRONTIER_VARIANTS = ("ppo", "ppo_rm")
_LAST_STEPS = 10  # logged steps averaged for a frontier point
_PASS_K = 8  # temperature-1 samples per held-out problem in `sampled_accuracy`


def sample(
    workdir: pathlib.Path, problems, n: int, temperature: float, seed: int, max_new_tokens: int
) -> list[list[str]]:
    """`n` sampled responses per problem from the newest checkpoint of `workdir`."""
    start = source.from_workdir(workdir)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = jax.device_get(start.load_params(mesh))
    tokenizer = start.tokenizer
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode([p.prompt for p in problems])]
    samples = [[] for _ in problems]
    for draw in range(n):
        for begin in range(0, len(prompts), _SAMPLE_BATCH):
            batch = prompts[begin : begin + _SAMPLE_BATCH]
            outputs = generate(
                start.model_config, params, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                rng=jax.random.fold_in(jax.random.key(seed), draw * len(prompts) + begin),
                eos_id=tokenizer.eos_id,
            )
            for offset, text in enumerate(online.response_texts(tokenizer, outputs.tokens)):
                samples[begin + offset].append(text)
    return samples


def write_data(root: pathlib.Path, sft_workdir: pathlib.Path | None) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    task = experiment.get_config("sft").task
    digits = dict(min_digits=task.min_digits, max_digits=task.max_digits)
    if sft_workdir is None:
        train = arithmetic.generate(_SFT_PROBLEMS.value, seed=0, split="train", **digits)
        held_out = arithmetic.generate(500, seed=3, split="test", **digits)
        arithmetic.write_jsonl(data / "sft_train.jsonl", arithmetic.sft_records(train))
        arithmetic.write_jsonl(data / "sft_eval.jsonl", arithmetic.sft_records(held_out))
        return
    report = {}
    for split, count, seed in (("train", _PAIR_PROBLEMS.value, 4), ("eval", 300, 5)):
        problems = arithmetic.generate(count, seed=seed, split="train" if split == "train" else "test", **digits)
        drawn = sample(sft_workdir, problems, _SAMPLES.value, _TEMPERATURE.value, seed, task.max_new_tokens)
        # A response that is EOS alone, or one holding PAD or BOS (`response_texts`), is no example.
        kept = [(p, [s for s in ss if s.strip()]) for p, ss in zip(problems, drawn)]
        problems, samples = zip(*[(p, ss) for p, ss in kept if ss])
        problems, samples = list(problems), list(samples)
        pairs, report[split] = arithmetic.preference_pairs(problems, samples, seed=seed)
        report[split]["sample_accuracy"] = arithmetic.score(
            [p for p, s in zip(problems, samples) for _ in s], [x for s in samples for x in s]
        )["accuracy"]
        arithmetic.write_jsonl(data / f"pairs_{split}.jsonl", pairs)
        arithmetic.write_jsonl(data / f"kto_{split}.jsonl", arithmetic.kto_records(problems, samples))
    arithmetic.write_whole(data / "pairs_report.json", json.dumps(report, indent=2))  # last: marks the stage done
    log.info("preference pairs: %s", report)


def run_stage(root: pathlib.Path, variant: str, init: pathlib.Path, kl_coef: float | None = None) -> dict:
    cfg = experiment.get_config(variant)
    cfg.init.from_workdir = str(init)
    if kl_coef is not None:
        cfg.rl.kl_coef = kl_coef
    for key in ("train_paths", "eval_paths"):
        cfg.data[key] = tuple(str(root / "data" / pathlib.Path(p).name) for p in cfg.data[key])
    if cfg.rl.reward_model:
        cfg.rl.reward_model = str(root / "reward")
    workdir = root / variant if kl_coef is None else frontier_workdir(root, variant, kl_coef)
    return align_train.run(cfg, workdir).last_eval


def sampled_accuracy(workdir: pathlib.Path, variant: str) -> dict[str, float]:
    """On the held-out problems every stage is evaluated on: greedy accuracy, the fraction of
    `_PASS_K` temperature-1 samples that are right, pass@k, and the fraction of problems that
    greedy decoding gets wrong although one of the samples is right."""
    task = experiment.get_config(variant).task
    problems = arithmetic.generate(
        task.problems, seed=task.seed, split="test", min_digits=task.min_digits, max_digits=task.max_digits
    )
    greedy = sample(workdir, problems, 1, 0.0, 0, task.max_new_tokens)
    drawn = sample(workdir, problems, _PASS_K, 1.0, 0, task.max_new_tokens)
    greedy_right = np.array([arithmetic.is_correct(p, s[0]) for p, s in zip(problems, greedy)])
    sample_right = np.array([[arithmetic.is_correct(p, x) for x in s] for p, s in zip(problems, drawn)])
    return {
        "greedy": float(greedy_right.mean()),
        "sampled": float(sample_right.mean()),
        f"pass@{_PASS_K}": float(sample_right.any(1).mean()),
        "greedy_wrong_a_sample_right": float((~greedy_right & sample_right.any(1)).mean()),
    }


def frontier_workdir(root: pathlib.Path, variant: str, kl_coef: float) -> pathlib.Path:
    if kl_coef == experiment.get_config(variant).rl.kl_coef:
        return root / variant
    return root / "frontier" / f"{variant}_kl{kl_coef:g}"


def frontier(root: pathlib.Path, kl_coefs: list[float]) -> dict[str, list[dict]]:
    """One point per run of `ppo` and `ppo_rm` at each KL coefficient (their own one included):
    the means over the last logged steps of the KL to the SFT model (nats per response), the
    score of the samples and, scored by the reward model, the checker's reward of the same
    samples; and the final greedy held-out accuracy."""
    points = {}
    for variant in _FRONTIER_VARIANTS:
        coefs = sorted({*kl_coefs, experiment.get_config(variant).rl.kl_coef})
        points[variant] = []
        for coef in coefs:
            rows = read_metrics(frontier_workdir(root, variant, coef) / "metrics.jsonl")
            logged = [r for r in rows if "objective/kl" in r][-_LAST_STEPS:]
            mean = lambda key: sum(r[key] for r in logged) / len(logged)
            point = dict(kl_coef=coef, kl=mean("objective/kl"), scores=mean("objective/scores"))
            if variant == "ppo_rm":
                point["task_reward"] = mean("objective/task_reward")
            point["eval_accuracy"] = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1]
            points[variant].append(point)
    return points


def plot_summary(root: pathlib.Path, out_path: pathlib.Path) -> None:
    """Held-out accuracy, DPO/KTO reward margins, and the reward model's pairwise accuracy,
    against the steps of each stage after SFT (step 0: the SFT model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {v: read_metrics(root / v / "metrics.jsonl") for v in experiment.VARIANTS}
    sft_accuracy = [r["eval_accuracy"] for r in rows["sft"] if "eval_accuracy" in r][-1]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for variant in ("dpo", "dpo_plain", "dpo_lora", "kto"):
        points = [(0, sft_accuracy)] + [(r["step"], r["eval_accuracy"]) for r in rows[variant] if "eval_accuracy" in r]
        axes[0].plot(*zip(*points), "o-", ms=3, label=variant)
        margins = [(r["step"], r["rewards/margins"]) for r in map(with_kto_margins, rows[variant]) if "rewards/margins" in r]
        axes[1].plot(*zip(*margins), lw=1, label=f"{variant} (train)")
    pairwise = [(r["step"], r["eval_pairwise_accuracy"]) for r in rows["reward"] if "eval_pairwise_accuracy" in r]
    axes[2].plot(*zip(*pairwise), "o-", ms=3, color="tab:purple", label="held-out pairs")
    titles = ("held-out accuracy (greedy)", "reward margin, chosen - rejected", "reward model pairwise accuracy")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step after SFT" if ax is not axes[2] else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_online(root: pathlib.Path, out_path: pathlib.Path) -> None:
    """PPO, GRPO and PPO scored by the reward model, by step: the mean task reward of the
    sampled responses, their KL to the reference (summed over the response, k1), greedy
    held-out accuracy, and the reward model's normalized score of ppo_rm's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_accuracy = [r["eval_accuracy"] for r in read_metrics(root / "sft" / "metrics.jsonl") if "eval_accuracy" in r][-1]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for variant in ("ppo", "grpo", "ppo_rm"):
        rows = read_metrics(root / variant / "metrics.jsonl")
        logged = [r for r in rows if "objective/scores" in r]
        steps = [r["step"] for r in logged]
        task_reward = "objective/task_reward" if variant == "ppo_rm" else "objective/scores"
        axes[0].plot(steps, [r[task_reward] for r in logged], lw=1, label=variant)
        axes[1].plot(steps, [r["objective/kl"] for r in logged], lw=1, label=variant)
        points = [(0, sft_accuracy)] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        axes[2].plot(*zip(*points), "o-", ms=3, label=variant)
        if variant == "ppo_rm":
            axes[3].plot(steps, [r["objective/scores"] for r in logged], lw=1, color="tab:green", label=variant)
    titles = (
        "task reward of the samples (train)", "KL to the SFT model (nats per response)",
        "held-out accuracy (greedy)", "reward model score of the samples",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step after SFT")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_frontier(points: dict[str, list[dict]], sft_accuracy: float, out_path: pathlib.Path) -> None:
    """Reward against KL to the SFT model, one point per KL coefficient: greedy held-out
    accuracy and the checker's reward of the samples; scored by the reward model, also its
    score of the same samples (the proxy that run maximizes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [("eval_accuracy", "held-out accuracy (greedy)"), ("scores", "checker reward of the samples")]
    panels = (
        ("ppo", "PPO scored by the checker", series),
        ("ppo_rm", "PPO scored by the reward model",
         [series[0], ("task_reward", series[1][1]), ("scores", "reward model score of the samples")]),
    )
    for ax, (variant, title, lines) in zip(axes, panels):
        run = sorted(points[variant], key=lambda p: p["kl"])
        kl = [p["kl"] for p in run]
        for key, label in lines:
            ax.plot(kl, [p[key] for p in run], "o-", ms=4, label=label)
        for p in run:
            ax.annotate(f"{p['kl_coef']:g}", (p["kl"], p["eval_accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(sft_accuracy, color="gray", ls="--", lw=1, label="SFT held-out accuracy")
        ax.set_xscale("log")
        ax.set_xlabel("KL to the SFT model (nats per response); labels: KL coefficient")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def frontier_table(points: dict[str, list[dict]]) -> str:
    lines = [
        "| run | KL coefficient | KL to SFT | sample score | checker reward of the samples | held-out accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for variant, rows in points.items():
        for p in rows:
            checker = p.get("task_reward", p["scores"])
            lines.append(
                f"| {variant} | {p['kl_coef']:g} | {p['kl']:.2f} | {p['scores']:.3f} | {checker:.3f} | {p['eval_accuracy']:.3f} |"
            )
    return "\n".join(lines)


def table(summary: dict) -> str:
    """The results as a Markdown table: greedy accuracy and mean task reward on held-out
    problems; on held-out pairs, the implicit (DPO) or learned (reward model) pairwise accuracy."""
    lines = [
        "| stage | held-out accuracy | mean task reward | held-out pair accuracy |",
        "|---|---|---|---|",
    ]
    for variant in experiment.VARIANTS:
        e = summary[variant]
        pairs = e.get("eval_rewards/accuracies", e.get("eval_pairwise_accuracy"))
        cells = [e.get("eval_accuracy"), e.get("eval_task_reward"), pairs]
        lines.append(f"| {variant} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    root = pathlib.Path(_WORKDIR.value)
    pretrained = pathlib.Path(_PRETRAINED.value or root / "pretrained")
    base = quickstart.get_config()
    base.data.tokenizer.split_digits = True
    if not _PRETRAINED.value:  # resumes, or evaluates a finished run again
        pretrain.run(base, pretrained)
    # Each data stage is done once the file it writes last exists.
    if not (root / "data" / "sft_eval.jsonl").exists():
        write_data(root, None)
    summary = {"sft": run_stage(root, "sft", pretrained)}
    if not (root / "data" / "pairs_report.json").exists():
        write_data(root, root / "sft")
    summary["pairs"] = json.loads((root / "data" / "pairs_report.json").read_text())
    for variant in experiment.VARIANTS[1:]:
        summary[variant] = run_stage(root, variant, root / "sft")
    kl_coefs = [float(c) for c in _KL_COEFS.value]
    for variant in _FRONTIER_VARIANTS:
        for coef in kl_coefs:
            run_stage(root, variant, root / "sft", kl_coef=coef)
    summary["frontier"] = frontier(root, kl_coefs)
    summary["sampling"] = {v: sampled_accuracy(root / v, v) for v in ("sft", "ppo", "grpo")}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_summary(root, root / "accuracy.png")
    plot_online(root, root / "online.png")
    plot_frontier(summary["frontier"], summary["sft"]["eval_accuracy"], root / "frontier.png")
    print(table(summary))
    print(frontier_table(summary["frontier"]))
    print(json.dumps(summary["sampling"], indent=2))


if __name__ == "__main__":
    run_program(main)
