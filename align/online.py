"""Online reinforcement learning (PPO, GRPO) on a task with a checker, on the shared loop.

One training step of the loop:
  1. rollout (compiled): each prompt of the batch is sampled `rl.samples_per_prompt` times by
     the policy (model/generate.py's decode loop, stopping at EOS or `task.max_new_tokens`);
  2. scores: the task's checker reads each decoded response (align/tasks/, on the host), or a
     reward model (`rl.reward_model`, compiled) reads prompt and response as it read its
     training pairs;
  3. update (compiled, the state donated): old, reference and value estimates of the rollout
     under the current weights, per-token rewards and advantages (align/rl.py), then
     `rl.epochs` passes over `rl.minibatches` shuffled minibatches, each one optimizer update
     through `train.step.train_step`, the update every method uses.
The old log-probs are recomputed by the training forward pass, not taken from the sampler,
so the first minibatch of each rollout has ratio 1, clip fraction 0 and approximate KL 0
exactly. Log-probs everywhere are of logits / `rl.temperature`, the sampling temperature.

The rollout's random key is derived from the state, so a resumed run samples what the
uninterrupted one did. `state.step` counts training steps (rollouts); the optimizer schedule
counts the `epochs * minibatches` updates of each.

Arrays: a rollout batch of R = prompts * samples_per_prompt rows, P prompt slots (left
padded), N response slots; training rows hold P + N - 1 inputs, and the response's targets
are the last N.
"""

from __future__ import annotations

import functools
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

import model
from align import reward, rl, trees
from align.source import RewardModel
from align.tasks import arithmetic
from model.generate import Sampling, sample_padded
from model.logprobs import target_logprobs
from model.sharding import host_values
from train.loop import global_batch
from train.step import LossOutput, batch_sharding, train_step

METHODS = ("ppo", "grpo")
_READ_IN_PLACE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def prompt_examples(cfg, tokenizer, split: str) -> tuple[list, list[dict]]:
    """(the task's problems, each as a left-padded prompt (BOS first) and its index)."""
    t = cfg.task
    count = cfg.rl.train_problems if split == "train" else t.problems
    problems = arithmetic.generate(count, seed=t.seed, min_digits=t.min_digits, max_digits=t.max_digits, split=split)
    P = cfg.data.max_prompt_len
    examples = []
    for problem, ids in zip(problems, tokenizer.encode([p.prompt for p in problems])):
        ids = [tokenizer.bos_id] + ids
        if len(ids) > P:
            raise ValueError(f"data.max_prompt_len={P}: the prompt {problem.prompt!r} has {len(ids)} tokens")
        prompt = np.zeros(P, np.int32)
        prompt[P - len(ids):] = ids
        examples.append({"prompt": prompt, "length": np.int32(len(ids)), "index": np.int32(len(examples))})
    return problems, examples


def prompt_iterator(examples, *, batch_size: int, seed: int, shard_index: int, shard_count: int):
    """Endless batches of prompts, reshuffled every epoch; resumable (`get_state`)."""
    shard = grain.MapDataset.source(examples)[shard_index::shard_count]
    if len(shard) < batch_size:
        raise ValueError(f"shard {shard_index} gets {len(shard)} prompts, fewer than batch_size={batch_size}")
    dataset = shard.shuffle(seed=seed).repeat().to_iter_dataset(_READ_IN_PLACE)
    return iter(dataset.batch(batch_size, drop_remainder=True))


def rollout_fn(cfg, model_config: model.ModelConfig, eos_id: int):
    """jit: (params, frozen, prompts, rng) -> the rollout's tokens [R, N]; R = prompts x G."""
    G, N = cfg.rl.samples_per_prompt, cfg.task.max_new_tokens
    sampling = Sampling(temperature=cfg.rl.temperature).as_arrays()

    @jax.jit
    def rollout(params, frozen, batch, rng):
        policy = trees.policy(cfg, params, frozen)
        prompts_RP = jnp.repeat(batch["prompt"], G, axis=0)
        lengths_R = jnp.repeat(batch["length"], G, axis=0)
        budget_R = jnp.full(lengths_R.shape, N, jnp.int32)
        tokens_RN, _ = sample_padded(
            model_config, policy, prompts_RP, lengths_R, budget_R, rng, sampling, jnp.int32(eos_id), capacity=N
        )
        return tokens_RN

    return rollout


def response_mask(tokens_RN, eos_id: int):
    """Real response tokens: through the first EOS (all N when there is none)."""
    is_eos = tokens_RN == eos_id
    before_eos = np.cumsum(is_eos, axis=1) - is_eos == 0
    return before_eos, is_eos.any(axis=1)


def response_texts(tokenizer, responses: list[list[int]]) -> list[str]:
    """Responses (their ids up to EOS) as a task's checker reads them. One holding PAD or BOS
    reads as "", which no checker takes for an answer: decoding drops those ids, so its text
    would hide tokens the policy emitted (4, PAD, 17 would read as the right answer 417)."""
    control = {tokenizer.pad_id, tokenizer.bos_id}
    texts = tokenizer.decode([list(r) for r in responses])
    return ["" if control.intersection(r) else text for r, text in zip(responses, texts)]


def scores(tokenizer, tokens_RN, mask_RN, answers_R) -> np.ndarray:
    """The task checker's reward of each response (its tokens before EOS), read by
    `response_texts`."""
    responses = response_texts(tokenizer, [row[m & (row != tokenizer.eos_id)].tolist() for row, m in zip(tokens_RN, mask_RN)])
    return np.asarray([arithmetic.reward_of_answer(int(a), r) for a, r in zip(answers_R, responses)], np.float32)


def _joined(prompts_RP, lengths_R, tokens_RN, response_RN):
    """(prompt + response [R, P + N], its real tokens, their positions): the left-padded prompt
    followed by the response tokens `response_RN` marks."""
    R, P = prompts_RP.shape
    sequence = np.concatenate([prompts_RP, tokens_RN], axis=1)
    slots = np.arange(sequence.shape[1])
    real = (slots >= P - lengths_R[:, None]) & np.concatenate([np.ones((R, P), bool), response_RN], axis=1)
    positions = np.maximum(slots[None, :] - (P - lengths_R[:, None]), 0).astype(np.int32)
    return sequence, real, positions


def training_rows(prompts_RP, lengths_R, tokens_RN, mask_RN) -> dict[str, np.ndarray]:
    """Prompt + response as [R, P + N - 1] inputs and targets; padding has segment id 0."""
    sequence, real, positions = _joined(prompts_RP, lengths_R, tokens_RN, mask_RN)
    return {
        "inputs": sequence[:, :-1], "targets": sequence[:, 1:], "segment_ids": real.astype(np.int32)[:, :-1],
        "positions": positions[:, :-1], "response_mask": mask_RN.astype(np.float32),
    }


def reward_model_rows(prompts_RP, lengths_R, tokens_RN, mask_RN, eos_id: int) -> dict[str, np.ndarray]:
    """Prompt + response as [R, P + N] rows the way a reward model read its training pairs:
    the last real token is the response's last token before EOS (align/data.py's rows end
    there, their EOS being a target only)."""
    sequence, real, positions = _joined(prompts_RP, lengths_R, tokens_RN, mask_RN & (tokens_RN != eos_id))
    return {"inputs": np.where(real, sequence, 0), "segment_ids": real.astype(np.int32), "positions": positions}


def reward_model_scorer(reward_model: RewardModel, mesh):
    """(rows of `reward_model_rows`, this process's share) -> the reward model's normalized
    scores of every row (its reference set's mean 0 and std 1), as a numpy array."""

    @jax.jit
    def normalized(params, normalization, rows):
        raw = reward.head_rewards(reward_model.model_config, params["model"], params["score"], rows)
        return (raw - normalization["mean"]) / normalization["std"]

    def score(rows):
        local = jax.tree.map(lambda x: x[_local_rows(len(x))], rows)
        values = normalized(reward_model.params, reward_model.normalization, global_batch(local, mesh))
        return host_values(values).astype(np.float32)

    return score


def _response_logps(cfg, model_config, params, rows, N):
    """(log-probs [R, N] of the response tokens, final hidden states [R, N, D] that predict them)."""
    hidden = model.hidden_states(
        model_config, params, rows["inputs"], segment_ids=rows["segment_ids"], positions=rows["positions"]
    )
    logp, _ = target_logprobs(
        model_config, params, hidden, rows["targets"], chunk=cfg.train.loss_chunk, temperature=cfg.rl.temperature
    )
    return logp[:, -N:], hidden[:, -N:]


def _values(params, hidden_RND):
    head = params["value"]
    return jnp.einsum("RND,D->RN", hidden_RND.astype(jnp.float32), head["w"]) + head["b"]


def loss_fn(cfg, model_config: model.ModelConfig, N: int):
    """The minibatch loss: PPO's clipped policy and value losses, or GRPO's; sums over the
    minibatch's response tokens (GRPO "sequence": over its rows), as train.step expects."""
    r = cfg.rl

    def loss(params, frozen, mb, rng):
        del rng
        policy = trees.policy(cfg, params, frozen)
        logp, hidden = _response_logps(cfg, model_config, policy, mb, N)
        mask = mb["response_mask"]
        tokens = jnp.sum(mask)
        if cfg.method == "ppo":
            pg, pg_metrics = rl.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, clip_eps=r.clip_eps)
            vf, vf_metrics = rl.ppo_value_loss(
                _values(params, hidden), mb["old_values"], mb["returns"], mask, clip_eps_value=r.clip_eps_value
            )
            objective = pg + r.vf_coef * vf
            metrics = {
                "loss": objective, "loss/policy_avg": pg, "loss/value_avg": vf, "val/clipfrac_avg": vf_metrics["clipfrac"],
                "policy/approxkl_avg": pg_metrics["approxkl"], "policy/clipfrac_avg": pg_metrics["clipfrac"],
                "policy/ratio_avg": pg_metrics["ratio"],
            }
            weight = tokens
        else:
            objective, metrics = rl.grpo_loss(
                logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], mask, clip_eps=r.clip_eps,
                kl_coef=r.kl_coef, aggregation=r.grpo_aggregation,
            )
            metrics = {
                "loss": objective, "policy/kl_avg": metrics["kl"], "policy/clipfrac_avg": metrics["clipfrac"],
                "policy/ratio_avg": metrics["ratio"],
            }
            weight = tokens if r.grpo_aggregation == "token" else jnp.asarray(mask.shape[0], jnp.float32)
        return LossOutput(objective * weight, weight, {k: v * weight for k, v in metrics.items()})

    return loss


def update_fn(cfg, model_config: model.ModelConfig, optimizer, mesh, shardings, N: int):
    """jit: (state, rollout rows with scores) -> (state, metrics), the state donated."""
    r = cfg.rl
    minibatch_loss = loss_fn(cfg, model_config, N)
    one_update = functools.partial(train_step, loss_fn=minibatch_loss, optimizer=optimizer, microbatches=1)

    def update(state, batch):
        mask = batch["response_mask"]
        policy = trees.policy(cfg, state.params, state.frozen)
        old_logp, hidden = _response_logps(cfg, model_config, policy, batch, N)
        ref_logp, _ = _response_logps(cfg, model_config, trees.reference(cfg, state.params, state.frozen), batch, N)
        kl = rl.kl_penalty(old_logp, ref_logp, r.kl_estimator) * mask
        kl_sum_R = jnp.sum(kl, axis=1)
        prepared = {**batch, "old_logp": old_logp, "ref_logp": ref_logp}
        frozen = state.frozen
        score_R = batch["scores"]
        if cfg.method == "ppo":
            kl_coef = frozen["kl_coef"]
            score_R = jnp.where(batch["ended_with_eos"], score_R, score_R - r.missing_eos_penalty)
            rewards, _ = rl.ppo_rewards(score_R, old_logp, ref_logp, mask, kl_coef=kl_coef, estimator=r.kl_estimator)
            if r.whiten_rewards:
                rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
            old_values = _values(state.params, hidden)
            advantages, returns = rl.compute_gae(rewards, old_values, mask, r.gamma, r.lam)
            advantages = rl.masked_whiten(advantages, mask)
            prepared.update(advantages=advantages, returns=returns, old_values=old_values)
            if r.kl_target:
                mean_kl = jnp.mean(kl_sum_R)
                new_coef = rl.adaptive_kl_coef(kl_coef, mean_kl, mask.shape[0], r.kl_target, r.kl_horizon)
                frozen = {**frozen, "kl_coef": new_coef}
            kl_coef_used = kl_coef
        else:
            prepared["advantages"] = rl.grpo_advantages(score_R, r.samples_per_prompt, scale=r.grpo_scale)
            kl_coef_used = jnp.asarray(r.kl_coef, jnp.float32)
        prepared = jax.lax.stop_gradient(prepared)

        R = mask.shape[0]
        rng, shuffle_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        orders = jnp.stack([jax.random.permutation(k, R) for k in jax.random.split(shuffle_key, r.epochs)])
        minibatches = jax.tree.map(
            lambda x: x[orders.reshape(-1)].reshape(r.epochs * r.minibatches, R // r.minibatches, *x.shape[1:]),
            prepared,
        )
        step = state.step
        inner, metrics = jax.lax.scan(lambda s, mb: one_update(s, mb), state, minibatches)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["finite"] = metrics["finite"] > 0.999  # every update of the step was finite
        metrics["nonfinite_steps"] = inner.nonfinite_steps
        rlhf_reward = score_R - kl_coef_used * kl_sum_R
        metrics.update({
            "objective/kl": jnp.mean(kl_sum_R),
            "objective/entropy": -jnp.mean(jnp.sum(old_logp * mask, axis=1)),
            "objective/scores": jnp.mean(score_R),  # PPO: after the missing-EOS penalty
            "objective/rlhf_reward": jnp.mean(rlhf_reward),
            "objective/kl_coef": kl_coef_used,
            "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "ended_with_eos": jnp.mean(batch["ended_with_eos"].astype(jnp.float32)),
        })
        if cfg.method == "grpo":
            metrics["zero_variance_groups"] = rl.zero_variance_fraction(score_R, r.samples_per_prompt)
        new_state = inner.replace(step=step + 1, frozen=frozen, rng=jax.random.key_data(rng))
        return new_state, metrics

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(update, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated), donate_argnums=0)


def train_step_fn(cfg, model_config, tokenizer, problems, optimizer, mesh, shardings, reward_model=None):
    """The loop's step: rollout, scoring, update. `batch` holds prompts (global arrays) and their
    indices into `problems`. With `reward_model` it scores the responses, and the checker's
    mean reward is logged beside as `objective/task_reward`."""
    N = cfg.task.max_new_tokens
    eos = tokenizer.eos_id
    rollout = rollout_fn(cfg, model_config, eos)
    update = update_fn(cfg, model_config, optimizer, mesh, shardings, N)
    G = cfg.rl.samples_per_prompt
    score_by_model = reward_model_scorer(reward_model, mesh) if reward_model else None

    def step(state, batch):
        jax.block_until_ready(state.step)  # the previous update, so the phases time themselves
        start = time.perf_counter()
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)  # the update splits state.rng
        tokens = host_values(rollout(state.params, state.frozen, batch, key))
        generated = time.perf_counter()
        prompts, lengths = host_values(batch["prompt"]), host_values(batch["length"])
        answers = np.repeat([problems[i].answer for i in host_values(batch["index"])], G)
        mask, ended = response_mask(tokens, eos)
        prompts_RP, lengths_R = np.repeat(prompts, G, axis=0), np.repeat(lengths, G)
        rows = training_rows(prompts_RP, lengths_R, tokens, mask)
        rows["scores"] = scores(tokenizer, tokens, mask, answers)
        host_metrics = {}
        if score_by_model:
            host_metrics["objective/task_reward"] = np.float64(rows["scores"].mean())
            rows["scores"] = score_by_model(reward_model_rows(prompts_RP, lengths_R, tokens, mask, eos))
        rows["ended_with_eos"] = ended
        local = jax.tree.map(lambda x: np.asarray(x)[_local_rows(len(x))], rows)
        scored = time.perf_counter()
        state, metrics = update(state, global_batch(local, mesh))
        metrics.update(host_metrics)
        # The update's own time is the rest of the loop's step_time.
        metrics.update({"time/generation_s": np.float64(generated - start), "time/scoring_s": np.float64(scored - generated)})
        return state, metrics

    return step


def _local_rows(n: int) -> slice:
    """This process's contiguous share of n rows (each process feeds its part of the batch)."""
    share = n // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)
