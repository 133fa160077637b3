"""Sampling continuations with the KV cache: greedy or temperature sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import decode_step, init_cache, prefill


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature"))
def _generate(config, params, prompts_BP, lengths_B, rng, *, max_new_tokens, temperature):
    B, P = prompts_BP.shape
    pad_B = P - lengths_B
    slots_BP = jnp.arange(P)[None, :]
    segment_ids = (slots_BP >= pad_B[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots_BP - pad_B[:, None], 0)
    cache = init_cache(config, B, P + max_new_tokens)
    logits, cache = prefill(config, params, prompts_BP, cache, segment_ids=segment_ids, positions=positions)

    def step(carry, key):
        logits_BV, cache, position_B = carry
        if temperature == 0.0:
            token_B = jnp.argmax(logits_BV, axis=-1)
        else:
            token_B = jax.random.categorical(key, logits_BV / temperature, axis=-1)
        token_B = token_B.astype(jnp.int32)
        logits_BV, cache = decode_step(config, params, token_B, cache, positions=position_B)
        return (logits_BV, cache, position_B + 1), token_B

    keys = jax.random.split(rng, max_new_tokens)
    _, tokens_NB = jax.lax.scan(step, (logits[:, -1], cache, lengths_B), keys)
    return tokens_NB.T


def generate(
    config: ModelConfig,
    params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    rng=None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids; prompts may differ in length) by up to
    `max_new_tokens` tokens; temperature 0 is greedy. Output stops after `eos_id`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={config.max_seq_len}"
        )
    padded = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, longest - len(prompt):] = prompt
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    rng = jax.random.key(0) if rng is None else rng
    out = np.asarray(
        _generate(config, params, padded, lengths, rng, max_new_tokens=max_new_tokens, temperature=float(temperature))
    )
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        results.append(row)
    return results
