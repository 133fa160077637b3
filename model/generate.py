"""Sampling continuations with the KV cache.

Prompts are left-padded into one batch and run through the model once (prefill); then a
compiled `lax.while_loop` decodes one token per row per iteration, writing into the cache in
place, until every row has emitted EOS or used its budget. Positions count from each row's
first real token, so a padded row decodes exactly as it would alone.

Compiled shapes are bucketed (batch, prompt length and token budget rounded up to powers of
two) and the sampling settings are traced values, so calls with other prompts, batch sizes,
budgets or temperatures reuse one compilation per bucket.

Strategies: greedy (temperature 0), temperature, top-k, top-p (nucleus), min-p, presence
and frequency penalties (on the tokens generated so far), and `beam_search`. Each sampled
token comes with its log-probability under `log_softmax(logits / temperature)` (temperature
1 when greedy): the distribution `model.logprobs.target_logprobs` scores in training, before
the penalties and filters that only steer the sampler.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.sharding import host_values
from model.transformer import decode_step, init_cache, prefill, unrolled


@flax.struct.dataclass
class Sampling:
    """How the next token is drawn; every field is traced, so changing one does not recompile.

    temperature 0 is greedy. top_k 0, top_p 1 and min_p 0 turn those filters off; min_p keeps
    the tokens whose probability is at least min_p times the most likely token's.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def as_arrays(self) -> "Sampling":
        """Fixed dtypes, so that `temperature=1` and `temperature=1.0` share a compilation."""
        return jax.tree.map(
            lambda value, dtype: jnp.asarray(value, dtype),
            self, Sampling(jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.float32, jnp.float32),
        )


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per prompt: the new tokens (through EOS when it was emitted) and their log-probs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def _filter_logits(logits_BV, s: Sampling):
    """Logits outside the top-k / top-p / min-p sets set to -inf. As Hugging Face's warpers
    chain them: the nucleus is taken from the probabilities renormalized over the top k."""
    V = logits_BV.shape[-1]
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    k = jnp.where(s.top_k > 0, jnp.clip(s.top_k, 1, V), V)
    kth_B = jnp.take(sorted_BV, k - 1, axis=-1)
    probs_BV = jax.nn.softmax(jnp.where(jnp.arange(V) < k, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # Nucleus: the smallest prefix of the sorted tokens whose mass reaches top_p, and at least
    # the most likely token, so that top_p 0 is greedy rather than an empty set.
    nucleus_BV = (mass_before_BV < s.top_p) | (jnp.arange(V) == 0)
    nucleus_min_B = jnp.min(jnp.where(nucleus_BV, sorted_BV, jnp.inf), axis=-1)
    min_p_B = sorted_BV[:, 0] + jnp.log(jnp.maximum(s.min_p, 1e-30))
    threshold_B = jnp.maximum(jnp.maximum(kth_B, nucleus_min_B), jnp.where(s.min_p > 0, min_p_B, -jnp.inf))
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)


def next_token(logits_BV, counts_BV, key, s: Sampling):
    """(token [B], its log-prob [B]) from float32 logits; `counts_BV` counts the tokens
    generated so far (for the penalties)."""
    logprobs_BV = jax.nn.log_softmax(logits_BV / jnp.where(s.temperature > 0, s.temperature, 1.0), axis=-1)
    steered_BV = (
        logits_BV
        - s.presence_penalty * (counts_BV > 0)
        - s.frequency_penalty * counts_BV
    )

    def sample(steered_BV):
        scaled_BV = steered_BV / s.temperature
        filtering = (s.top_k > 0) | (s.top_p < 1.0) | (s.min_p > 0.0)
        scaled_BV = jax.lax.cond(filtering, _filter_logits, lambda x, _: x, scaled_BV, s)
        return jax.random.categorical(key, scaled_BV, axis=-1)

    greedy = lambda steered_BV: jnp.argmax(steered_BV, axis=-1)
    token_B = jax.lax.cond(s.temperature > 0, sample, greedy, steered_BV).astype(jnp.int32)
    return token_B, jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _left_padded(prompts, batch, length):
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones(batch, np.int32)  # rows beyond the prompts: one padding token, no budget
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        lengths[row] = len(prompt)
    return tokens, lengths


def _prefill_prompts(config, params, prompts_BP, lengths_B, cache_len):
    B, P = prompts_BP.shape
    pad_B = P - lengths_B
    slots_BP = jnp.arange(P)[None, :]
    segment_ids = (slots_BP >= pad_B[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots_BP - pad_B[:, None], 0)
    cache = init_cache(config, B, cache_len)
    logits_BPV, cache = prefill(config, params, prompts_BP, cache, segment_ids=segment_ids, positions=positions)
    return logits_BPV[:, -1], cache


@functools.partial(jax.jit, static_argnames=("config", "capacity"))
def sample_padded(config, params, prompts_BP, lengths_B, budget_B, rng, sampling, eos_id, *, capacity):
    """(tokens [B, capacity], log-probs [B, capacity]) continuing left-padded prompts (row b's
    last `lengths_B[b]` slots are its prompt); row b stops after EOS or `budget_B[b]` tokens,
    and what follows is EOS with log-prob 0. Callable inside a jitted function (rollouts)."""
    B, P = prompts_BP.shape
    config, params = unrolled(config, params)
    logits_BV, cache = _prefill_prompts(config, params, prompts_BP, lengths_B, P + capacity)
    state = {
        "logits": logits_BV,
        "cache": cache,
        "counts": jnp.zeros(logits_BV.shape, jnp.float32),
        "done": budget_B <= 0,
        "tokens": jnp.full((B, capacity), eos_id, jnp.int32),
        "logprobs": jnp.zeros((B, capacity), jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }

    def keep_going(state):
        return (state["step"] < capacity) & ~jnp.all(state["done"])

    def step(state):
        t = state["step"]
        token_B, logprob_B = next_token(state["logits"], state["counts"], jax.random.fold_in(rng, t), sampling)
        live_B = ~state["done"]
        token_B = jnp.where(live_B, token_B, 0)  # finished rows decode a placeholder
        logprob_B = jnp.where(live_B, logprob_B, 0.0)
        logits_BV, cache = decode_step(config, params, token_B, state["cache"], positions=lengths_B + t)
        return {
            "logits": logits_BV,
            "cache": cache,
            "counts": state["counts"].at[jnp.arange(B), token_B].add(live_B.astype(jnp.float32)),
            "done": state["done"] | (live_B & (token_B == eos_id)) | (t + 1 >= budget_B),
            "tokens": state["tokens"].at[:, t].set(jnp.where(live_B, token_B, eos_id)),
            "logprobs": state["logprobs"].at[:, t].set(logprob_B),
            "step": t + 1,
        }

    state = jax.lax.while_loop(keep_going, step, state)
    return state["tokens"], state["logprobs"]


def _bucketed(config, prompts, max_new_tokens):
    """(left-padded prompts [batch, length], their lengths, new-token capacity), the batch,
    prompt length and capacity rounded up to powers of two within model.max_seq_len."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={config.max_seq_len}"
        )
    capacity = min(_bucket(max_new_tokens), config.max_seq_len - longest)
    length = min(_bucket(longest), config.max_seq_len - capacity)
    padded, lengths = _left_padded(prompts, _bucket(len(prompts)), length)
    return padded, lengths, capacity


def _until_eos(row: list, eos_id: int, max_new_tokens: int) -> int:
    """Length of a generated row: through its first EOS, at most `max_new_tokens`."""
    return row.index(eos_id) + 1 if eos_id in row[:max_new_tokens] else max_new_tokens


def generate(
    config: ModelConfig,
    params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    sampling: Sampling | None = None,
    rng=None,
    eos_id: int | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids; prompts may differ in length) by up to
    `max_new_tokens` tokens, stopping a row after `eos_id`. `temperature` is a shorthand for
    `Sampling(temperature=...)`; give `sampling` for the other strategies."""
    padded, lengths, capacity = _bucketed(config, prompts, max_new_tokens)
    sampling = sampling or Sampling(temperature=temperature)
    budgets = np.where(np.arange(len(padded)) < len(prompts), max_new_tokens, 0).astype(np.int32)
    stop_id = -1 if eos_id is None else eos_id
    tokens, logprobs = sample_padded(
        config, params, padded, lengths, budgets, jax.random.key(0) if rng is None else rng,
        sampling.as_arrays(), jnp.int32(stop_id), capacity=capacity,
    )
    tokens, logprobs = host_values(tokens)[: len(prompts)].tolist(), host_values(logprobs).tolist()
    ends = [_until_eos(row, stop_id, max_new_tokens) for row in tokens]
    return Generation([row[:end] for row, end in zip(tokens, ends)], [row[:end] for row, end in zip(logprobs, ends)])


@functools.partial(jax.jit, static_argnames=("config", "beams", "capacity"))
def _beam_search(config, params, prompts_BP, lengths_B, budget, eos_id, length_penalty, *, beams, capacity):
    """Best of `beams` hypotheses per prompt, scored by summed log-prob / length**penalty.

    As Hugging Face's beam scorer: each step ranks 2W candidates; an EOS among the first W
    finishes a hypothesis, the first W others continue; a prompt is done when W hypotheses
    have finished and none still alive could beat the worst of them.
    """
    B, P = prompts_BP.shape
    W = beams
    config, params = unrolled(config, params)
    logits_BV, cache = _prefill_prompts(config, params, prompts_BP, lengths_B, P + capacity)
    per_layer = lambda buffers, take: tuple(take(b) for b in buffers)  # the unrolled cache
    cache = {
        "k": per_layer(cache["k"], lambda b: jnp.repeat(b, W, axis=0)),
        "v": per_layer(cache["v"], lambda b: jnp.repeat(b, W, axis=0)),
        "segment_ids": jnp.repeat(cache["segment_ids"], W, axis=0),
        "index": cache["index"],
    }
    positions_R = jnp.repeat(lengths_B, W)  # R = B * W rows
    state = {
        "logits": jnp.repeat(logits_BV, W, axis=0),
        "cache": cache,
        # Only the first beam is alive at the start, so the W beams do not all pick the same token.
        "alive_scores": jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1)),
        "alive_tokens": jnp.zeros((B, W, capacity), jnp.int32),
        "finished_scores": jnp.full((B, W), -jnp.inf),
        "finished_tokens": jnp.full((B, W, capacity), eos_id, jnp.int32),
        "done": jnp.zeros((B,), bool),
        "step": jnp.zeros((), jnp.int32),
    }
    take = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def keep_going(state):
        return (state["step"] < budget) & ~jnp.all(state["done"])

    def step(state):
        t = state["step"]
        V = state["logits"].shape[-1]
        logprobs_BWV = jax.nn.log_softmax(state["logits"], axis=-1).reshape(B, W, V)
        candidates_BX = (state["alive_scores"][..., None] + logprobs_BWV).reshape(B, W * V)
        scores_BC, index_BC = jax.lax.top_k(candidates_BX, 2 * W)
        beam_BC, token_BC = index_BC // V, (index_BC % V).astype(jnp.int32)
        tokens_BCN = take(state["alive_tokens"], beam_BC).at[:, :, t].set(token_BC)
        is_eos_BC = token_BC == eos_id
        # Finished: EOS among the first W candidates, normalized by its length (t + 1 tokens).
        finishing_BC = is_eos_BC & (jnp.arange(2 * W) < W) & ~state["done"][:, None]
        normalized_BC = jnp.where(finishing_BC, scores_BC / (t + 1.0) ** length_penalty, -jnp.inf)
        pool_scores = jnp.concatenate([state["finished_scores"], normalized_BC], axis=1)
        pool_tokens = jnp.concatenate([state["finished_tokens"], tokens_BCN], axis=1)
        finished_scores, best = jax.lax.top_k(pool_scores, W)
        # Alive: the first W candidates that did not end in EOS.
        alive_scores, alive = jax.lax.top_k(jnp.where(is_eos_BC, -jnp.inf, scores_BC), W)
        parent_BW = take(beam_BC, alive)
        rows_R = (jnp.arange(B)[:, None] * W + parent_BW).reshape(-1)
        cache = state["cache"]
        cache = {**cache, "k": per_layer(cache["k"], lambda b: b[rows_R]), "v": per_layer(cache["v"], lambda b: b[rows_R])}
        next_R = take(token_BC, alive).reshape(-1)
        logits_RV, cache = decode_step(config, params, next_R, cache, positions=positions_R + t)
        # Done once W have finished and none beats the best alive score at the current length
        # (Hugging Face's early_stopping=False; exact for length_penalty <= 0, where a longer
        # hypothesis scores no higher).
        best_alive_B = alive_scores[:, 0] / (t + 1.0) ** length_penalty
        done = state["done"] | (jnp.isfinite(finished_scores[:, -1]) & (finished_scores[:, -1] >= best_alive_B))
        return {
            "logits": logits_RV,
            "cache": cache,
            "alive_scores": alive_scores,
            "alive_tokens": take(tokens_BCN, alive),
            "finished_scores": finished_scores,
            "finished_tokens": take(pool_tokens, best),
            "done": done,
            "step": t + 1,
        }

    state = jax.lax.while_loop(keep_going, step, state)
    # A prompt that ran to the budget also ranks its alive hypotheses (at full length). A done
    # one ranks only its finished ones, as it would alone: its alive ones went on only because
    # other prompts kept the loop running.
    alive_normalized = state["alive_scores"] / jnp.maximum(state["step"], 1.0) ** length_penalty
    alive_normalized = jnp.where(state["done"][:, None], -jnp.inf, alive_normalized)
    scores = jnp.concatenate([state["finished_scores"], alive_normalized], axis=1)
    tokens = jnp.concatenate([state["finished_tokens"], state["alive_tokens"]], axis=1)
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0], jnp.max(scores, axis=1)


def beam_search(
    config: ModelConfig,
    params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
) -> tuple[list[list[int]], list[float]]:
    """Per prompt, the highest-scoring continuation (through EOS) and its score: summed
    log-prob / (new tokens)**length_penalty. One beam is greedy decoding."""
    if beams < 1:
        raise ValueError(f"beam_search: beams={beams} must be at least 1")
    padded, lengths, capacity = _bucketed(config, prompts, max_new_tokens)
    stop_id = -1 if eos_id is None else eos_id
    tokens, scores = _beam_search(
        config, params, padded, lengths, jnp.int32(max_new_tokens), jnp.int32(stop_id),
        jnp.float32(length_penalty), beams=beams, capacity=capacity,
    )
    rows = host_values(tokens)[: len(prompts)].tolist()
    best = [row[: _until_eos(row, stop_id, max_new_tokens)] for row in rows]
    return best, host_values(scores)[: len(prompts)].tolist()

