"""Post-training entry point: SFT, DPO, KTO, reward models, PPO and GRPO on the shared training loop.

  python -m align.train --config=experiments/align/arithmetic_sft.py --workdir=runs/sft \
      [--config.method=dpo --config.init.from_workdir=runs/sft --config.lora.rank=8 ...]

Reads top to bottom: where the run starts (a workdir's checkpoint or Hugging Face weights,
with their tokenizer), config checks, mesh, data, the method's loss compiled into the shared
update, then `train.loop` (checkpoints, exact resume, SIGTERM, metrics), then plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from align import config as align_config
from align import data as align_data
from align import dpo, kto, online, plots, reward, sft, source, trees
from align.logprobs import response_logps
from align.tasks import arithmetic
from model import flops_per_token, param_counts, sharding
from model.generate import generate
from train import cli, loop
from train import workdir as workdir_lib
from train.loop import global_batch
from train.optimizer import learning_rate_schedule, make_optimizer
from train.state import abstract_state, init_state, state_shardings
from train.step import batch_sharding, compile_eval_step, compile_train_step, reported

log = logging.getLogger("align")

LOSSES = {"sft": sft.loss_fn, "dpo": dpo.loss_fn, "kto": kto.loss_fn, "reward": reward.loss_fn}
DATA_KIND = {"sft": "sft", "dpo": "preference", "kto": "kto", "reward": "preference"}
REFERENCE_CACHE = "reference_logps_{split}.npy"


def _shard_args(batch_size: int) -> dict:
    return dict(
        batch_size=batch_size // jax.process_count(),
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    )


def _sum_over(batches, step_fn, mesh) -> dict:
    """Sums of a compiled function's outputs (a dict of scalars and `Ratio`s) over batches, in
    float64 (a `Ratio` of no weight divides to NaN)."""
    totals = None
    for batch in batches:
        out = jax.tree.map(np.float64, jax.device_get(step_fn(global_batch(batch, mesh))))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    return totals or {}


def _per_example(fn, params, frozen, examples, kind, cfg, mesh, shardings) -> np.ndarray:
    """`fn(params, frozen, batch)` [B, ...] for every example, in order, gathered from every
    process (filler rows of the last batch left out)."""
    compute = jax.jit(fn, in_shardings=(shardings.params, shardings.frozen, batch_sharding(mesh)))
    rows = []
    with jax.set_mesh(mesh):
        for batch in align_data.eval_batches(
            examples, kind, seq_len=cfg.train.seq_len, **_shard_args(cfg.eval.batch_size)
        ):
            values = sharding.host_values(compute(params, frozen, global_batch(batch, mesh)))
            valid = multihost_utils.process_allgather(batch["valid"], tiled=True)  # host-local numpy
            rows.append(values[np.asarray(valid) > 0])
    return np.concatenate(rows)


def _cached_reference(cfg, workdir, model_config, mesh, shardings, start_trees, examples, split):
    """Reference log-probs [N, 2] of every pair under the starting policy, computed once and
    kept in the workdir, so a resumed run uses the same values. Only a run that resumes from a
    checkpoint reads them back: one killed before its first checkpoint may have left values of
    another starting model (`init.from_workdir` since holding a newer checkpoint, say)."""
    path = workdir / REFERENCE_CACHE.format(split=split)
    resuming = bool(ocp.utils.checkpoint_steps(workdir / "checkpoints"))
    if resuming and path.exists():
        with path.open("rb") as f:
            values = np.load(f)
        if len(values) == len(examples):
            return values
    params, frozen = start_trees()
    logps = lambda p, f, b: response_logps(model_config, trees.policy(cfg, p, f), b, cfg.train.loss_chunk)[0]
    values = _per_example(logps, params, frozen, examples, DATA_KIND[cfg.method], cfg, mesh, shardings)
    values = values.astype(np.float32)
    if jax.process_index() == 0:
        with path.open("wb") as f:
            np.save(f, values)
    return values


def task_accuracy(cfg, model_config, tokenizer, policy_params) -> dict[str, float]:
    """Greedy accuracy of the policy on held-out problems of the configured task."""
    t = cfg.task
    problems = arithmetic.generate(
        t.problems, seed=t.seed, min_digits=t.min_digits, max_digits=t.max_digits, split="test"
    )
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode([p.prompt for p in problems])]
    outputs = generate(
        model_config, policy_params, prompts, max_new_tokens=t.max_new_tokens, eos_id=tokenizer.eos_id
    )
    scores = arithmetic.score(problems, online.response_texts(tokenizer, outputs.tokens))
    return {"accuracy": scores["accuracy"], "task_reward": scores["mean_reward"]}


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> loop.Result:
    loop.begin_run()
    is_primary = jax.process_index() == 0
    start = source.resolve(cfg)
    model_config = start.model_config
    with cfg.unlocked():
        cfg.model = ml_collections.ConfigDict(dataclasses.asdict(model_config))
    align_config.validate(cfg, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), model_config=model_config)
    tokenizer = start.tokenizer

    online_rl = cfg.method in online.METHODS
    kind, seq_len = DATA_KIND.get(cfg.method), cfg.train.seq_len
    if online_rl:
        problems, train_examples = online.prompt_examples(cfg, tokenizer, "train")
        eval_examples, train_report, eval_report = [], {"prompts": len(train_examples)}, {}
    else:
        train_examples, train_report = align_data.load(kind, cfg.data, tokenizer, split="train", seq_len=seq_len)
        eval_examples, eval_report = align_data.load(kind, cfg.data, tokenizer, split="eval", seq_len=seq_len)
    workdir = workdir_lib.prepare(cfg, workdir)
    if is_primary:
        tokenizer.save(workdir / source.TOKENIZER_FILE)
        report = {"train": train_report, "eval": eval_report}
        (workdir / "data_report.json").write_text(json.dumps(report, indent=2, default=str))

    # Online RL makes epochs x minibatches updates per step: the schedule spans them all.
    updates_per_step = cfg.rl.epochs * cfg.rl.minibatches if online_rl else 1
    optimizer_cfg = cfg.optimizer.copy_and_resolve_references()
    optimizer_cfg.warmup_steps *= updates_per_step
    total_updates = cfg.train.steps * updates_per_step
    optimizer = make_optimizer(optimizer_cfg, total_updates)
    params_boxed, frozen_boxed = trees.boxed_trees(cfg, model_config)
    shardings = state_shardings(optimizer, mesh, params_boxed, frozen_boxed)
    reward_model = _reward_model(cfg, model_config, tokenizer, mesh) if online_rl and cfg.rl.reward_model else None
    if online_rl:
        train_step = online.train_step_fn(
            cfg, model_config, tokenizer, problems, optimizer, mesh, shardings, reward_model
        )
    else:
        loss_fn = LOSSES[cfg.method](cfg, model_config)
        train_step = compile_train_step(loss_fn, optimizer, mesh, shardings, microbatches=cfg.train.microbatches)
        eval_step = compile_eval_step(loss_fn, mesh, shardings.params, shardings.frozen)

    def new_trees():
        policy = start.load_params(mesh)
        make = jax.jit(
            lambda p: nn.meta.unbox(trees.trees(cfg, model_config, p, jax.random.key(cfg.train.seed))),
            out_shardings=(shardings.params, shardings.frozen),
        )
        params, frozen = make(policy)
        if cfg.method == "ppo" and cfg.rl.value_init == "reward_model":
            value = jax.jit(_value_head_of, out_shardings=shardings.params["value"])
            params = {**params, "value": value(reward_model.params["score"], reward_model.normalization)}
        return params, frozen

    def new_state():
        params, frozen = new_trees()
        make = jax.jit(
            lambda p, f: init_state(p, optimizer, cfg.train.seed, f), out_shardings=shardings, donate_argnums=(0, 1)
        )
        return make(params, frozen)

    if cfg.method == "dpo" and cfg.dpo.reference == "cached":
        args = (cfg, workdir, model_config, mesh, shardings, new_trees)
        train_examples = align_data.with_field(
            train_examples, "reference_logps", _cached_reference(*args, train_examples, "train")
        )
        if eval_examples:
            eval_examples = align_data.with_field(
                eval_examples, "reference_logps", _cached_reference(*args, eval_examples, "eval")
            )

    def evaluate(state):
        metrics = {}
        if eval_examples:
            sums = _sum_over(
                align_data.eval_batches(eval_examples, kind, seq_len=seq_len, **_shard_args(cfg.eval.batch_size)),
                lambda b: eval_step(state.params, state.frozen, b), mesh,
            )
            weight = max(sums.pop("weight"), 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                metrics.update({f"eval_{k}": float(v) for k, v in reported(sums, weight).items()})
        if cfg.task.name and cfg.method != "reward":
            policy = trees.policy(cfg, state.params, state.frozen)
            scores = task_accuracy(cfg, model_config, tokenizer, policy)
            metrics.update({f"eval_{k}": v for k, v in scores.items()})
        return metrics

    def normalize(state):
        reference_set = eval_examples or train_examples
        return _normalize_rewards(cfg, model_config, mesh, shardings, state, reference_set)

    flops = flops_per_token(model_config, seq_len)["total"]  # forward and backward: 6N + attention
    if online_rl:
        rows = cfg.train.batch_size * cfg.rl.samples_per_prompt
        response = cfg.task.max_new_tokens
        row_len = cfg.data.max_prompt_len + response - 1
        flops = flops_per_token(model_config, row_len)["total"]
        tokens_per_step = rows * row_len
        # Updates, the old and reference forward passes, and one forward per sampled token.
        flops_per_step = flops * tokens_per_step * (updates_per_step / cfg.rl.minibatches + 2 / 3)
        flops_per_step += flops / 3 * rows * response
    else:
        rows_per_example = 1 if kind == "sft" else 2
        tokens_per_step = cfg.train.batch_size * rows_per_example * seq_len
        if cfg.method == "reward":
            flops = reward.flops_per_token(model_config, seq_len)
        flops_per_step = flops * tokens_per_step
        if trees.online_reference(cfg):
            flops_per_step += flops / 3 * tokens_per_step  # the reference's forward pass
    counts = param_counts(model_config)
    trainable = sum(x.size for x in jax.tree.leaves(params_boxed))
    log.info(
        "%s from %s: %s parameters, %s trained; mesh %s; %d training and %d eval examples",
        cfg.method, start.description, f"{counts['total']:,}", f"{trainable:,}", dict(mesh.shape),
        len(train_examples), len(eval_examples),
    )
    job = loop.Job(
        train_step=train_step,
        batches=(
            online.prompt_iterator(train_examples, seed=cfg.train.seed, **_shard_args(cfg.train.batch_size))
            if online_rl else
            align_data.train_iterator(
                train_examples, kind, seq_len=seq_len, seed=cfg.train.seed, **_shard_args(cfg.train.batch_size)
            )
        ),
        new_state=new_state,
        abstract_state=abstract_state(optimizer, mesh, params_boxed, frozen_boxed),
        tokens_per_step=tokens_per_step,
        learning_rate=learning_rate_schedule(optimizer_cfg, total_updates),
        updates_per_step=updates_per_step,
        flops_per_step=flops_per_step,
        evaluate=evaluate,
        finish=normalize if cfg.method == "reward" else None,
    )
    result = loop.run(cfg, workdir, mesh, job)
    if is_primary:
        plots.plot_run(workdir / "metrics.jsonl", workdir / "training.png")
        print(f"{cfg.method} finished: " + ", ".join(f"{k} {v:.4g}" for k, v in result.last_eval.items()))
    return result


def _reward_model(cfg, model_config, tokenizer, mesh) -> source.RewardModel:
    """The reward model that scores PPO's or GRPO's responses, checked against the policy."""
    loaded = source.reward_model(cfg.rl.reward_model, mesh)
    if loaded.tokenizer.model_proto != tokenizer.model_proto:
        raise ValueError(f"config.rl.reward_model={cfg.rl.reward_model!r}: its tokenizer is not the policy's")
    if cfg.rl.value_init == "reward_model" and loaded.model_config.d_model != model_config.d_model:
        raise ValueError(
            f"config.rl.value_init='reward_model': the reward model's d_model={loaded.model_config.d_model} "
            f"is not the policy's {model_config.d_model}"
        )
    return loaded


def _value_head_of(score, normalization):
    """PPO's value head as the reward model's normalized head, (h·w + b - mean) / std, read on
    the policy's hidden states (InstructGPT starts its value model from the reward model; here
    the head starts from it, the trunk is the policy's)."""
    std = normalization["std"]
    return {"w": score["w"] / std, "b": (score["b"] - normalization["mean"]) / std}


def _normalize_rewards(cfg, model_config, mesh, shardings, state, examples):
    """Store the mean and std of the rewards of `examples` (chosen and rejected alike)."""
    raw = lambda p, f, b: reward.rewards(cfg, model_config, p, f, b)
    values = _per_example(
        raw, state.params, state.frozen, examples, "preference", cfg, mesh, shardings
    ).ravel()
    mean, std = float(values.mean()), float(max(values.std(), 1e-6))
    log.info("reward normalization over %d responses: mean %.4f, std %.4f", values.size, mean, std)
    normalization = {"mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}
    normalization = jax.device_put(normalization, shardings.frozen["normalization"])
    return state.replace(frozen={**state.frozen, "normalization": normalization})


if __name__ == "__main__":
    cli.main(run)
