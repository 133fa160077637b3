"""Greedy generation throughput against Hugging Face `generate`, same weights, one process.

    python -m experiments.generation_peers --batch_sizes=1,8,32 --prompt_len=64 --new_tokens=256

A GPT-2-shaped model with random weights is built in `transformers` (GPT2LMHeadModel; the
shape flags below, default GPT-2 124M) and imported with `model.from_hf`, so both sides run
the same weights, in --dtype, on the default device (the CPU here, every core; torch takes
CUDA when it has it). Per batch size: random prompts of --prompt_len tokens, --new_tokens new
tokens (no EOS, so every row runs the whole budget), one warm-up call (compilation), then
--repeats rounds of timed calls, the calls of a round in turns (`train.timing.in_turns`); the
medians are printed. Hugging Face runs `generate(do_sample=False,
use_cache=True)`. The greedy outputs are compared token for token (in bfloat16 the two sides
round differently, so they may part). Our time per new token is also printed at a quarter of
the budget, to show that it does not grow with the cache length. Needs the `test` extra
(torch, transformers); with --nopeer only our side runs, on weights from `model.init_params`,
and neither is needed (a GPU machine without torch).
"""

from __future__ import annotations

import functools
import statistics
import tempfile

import jax
import numpy as np
from absl import flags

import model
from model.generate import generate
from train.cli import run_program
from train.timing import call_timer, in_turns

_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.", lower_bound=1)
_NEW = flags.DEFINE_integer("new_tokens", 256, "New tokens per row.", lower_bound=4)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.", lower_bound=1)
_LAYERS = flags.DEFINE_integer("n_layer", 12, "Layers.")
_HEADS = flags.DEFINE_integer("n_head", 12, "Attention heads.")
_WIDTH = flags.DEFINE_integer("n_embd", 768, "Model width.")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute, both sides.")
_PEER = flags.DEFINE_bool("peer", True, "Also run Hugging Face generate.")


def _after(untimed, timer):
    """`timer`, run after an untimed call of `untimed`. Our first call after a Hugging Face one
    runs slower on the CPU with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (batch 8, 64 new tokens:
    83-105 against 60-64 ms a token; no slower without the tunable): a short call of ours first
    takes that, so each side is timed at the pace it keeps alone."""
    def measure() -> float:
        untimed()
        return timer()
    return measure


def _hf_model():
    """The random GPT-2 in `transformers`, and its (config, params) imported here."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(
        n_layer=_LAYERS.value, n_head=_HEADS.value, n_embd=_WIDTH.value, vocab_size=_VOCAB.value,
        n_positions=max(1024, _PROMPT.value + _NEW.value),
    )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        config, params = model.from_hf(directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return hf_model.to(device, getattr(torch, _DTYPE.value)), config, params


def _our_model():
    config = model.get_config(
        "gpt2-124m", n_layers=_LAYERS.value, n_heads=_HEADS.value, n_kv_heads=_HEADS.value,
        d_model=_WIDTH.value, d_ff=4 * _WIDTH.value, vocab_size=_VOCAB.value,
        max_seq_len=max(1024, _PROMPT.value + _NEW.value),
    )
    return config, model.init_params(config, jax.random.key(0))


def main(argv):
    del argv
    hf_model, config, params = _hf_model() if _PEER.value else (None, *_our_model())
    config = config.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    params = jax.tree.map(lambda a: a.astype(_DTYPE.value), params)
    rng = np.random.default_rng(0)
    print(f"GPT-2 shape: {model.param_counts(config)['total']:,} parameters, {_DTYPE.value}; prompt "
          f"{_PROMPT.value}, {_NEW.value} new tokens, median of {_REPEATS.value}; {jax.devices()[0].device_kind}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'ms/token (1/4 budget, full)':>28} {'same tokens':>11}")
    for batch in map(int, _BATCHES.value):
        prompts = rng.integers(0, _VOCAB.value, (batch, _PROMPT.value)).tolist()

        def ours(new_tokens=_NEW.value):
            return generate(config, params, prompts, max_new_tokens=new_tokens).tokens

        ours_tokens = ours()  # warm-up (compilation)
        quarter = max(1, _NEW.value // 4)
        ours(quarter)
        timers = [call_timer(ours), call_timer(lambda: ours(quarter))]
        if hf_model is not None:
            theirs = functools.partial(_hf_generate, hf_model, prompts)
            their_tokens = theirs()  # warm-up and the comparison
            timers = [_after(lambda: ours(4), timers[0]), timers[1], call_timer(theirs)]
        ours_s, quarter_s, *theirs_s = (statistics.median(times) for times in in_turns(timers, _REPEATS.value))
        new = batch * _NEW.value
        timings = f"{quarter_s / quarter * 1e3:>17.2f}, {ours_s / _NEW.value * 1e3:>7.2f}"
        if hf_model is None:
            print(f"{batch:>5} {new / ours_s:>11,.0f} {'-':>9} {'-':>6} {timings}")
            continue
        print(
            f"{batch:>5} {new / ours_s:>11,.0f} {new / theirs_s[0]:>9,.0f} {theirs_s[0] / ours_s:>5.1f}x "
            f"{timings} {str(ours_tokens == their_tokens):>11}"
        )


def _hf_generate(hf_model, prompts):
    import torch

    with torch.no_grad():
        inputs = torch.tensor(prompts, device=hf_model.device)
        return hf_model.generate(
            inputs, attention_mask=torch.ones_like(inputs), do_sample=False, use_cache=True,
            max_new_tokens=_NEW.value, eos_token_id=None, pad_token_id=0,
        )[:, _PROMPT.value:].tolist()


if __name__ == "__main__":
    run_program(main)
