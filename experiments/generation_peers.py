"""Greedy generation throughput against Hugging Face `generate`, same weights, one process.

    python -m experiments.generation_peers --batch_sizes=1,8,32 --prompt_len=64 --new_tokens=256

A GPT-2-shaped model with random weights is built in `transformers` (GPT2LMHeadModel; the
shape flags below, default GPT-2 124M) and imported with `model.from_hf`, so both sides run
the same float32 weights on the default device (the CPU here, every core). Per batch size:
random prompts of --prompt_len tokens, --new_tokens new tokens (no EOS, so every row runs the
whole budget), one warm-up call (compilation), then the median of --repeats timed calls.
Hugging Face runs `generate(do_sample=False, use_cache=True)`. The greedy outputs are compared
token for token. Our time per new token is also printed at a quarter of the budget, to show
that it does not grow with the cache length. Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
from absl import flags

import model
from model.generate import generate
from train.cli import run_program

_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.", lower_bound=1)
_NEW = flags.DEFINE_integer("new_tokens", 256, "New tokens per row.", lower_bound=4)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.", lower_bound=1)
_LAYERS = flags.DEFINE_integer("n_layer", 12, "Layers.")
_HEADS = flags.DEFINE_integer("n_head", 12, "Attention heads.")
_WIDTH = flags.DEFINE_integer("n_embd", 768, "Model width.")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary.")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
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
    rng = np.random.default_rng(0)
    print(f"GPT-2 shape: {model.param_counts(config)['total']:,} parameters, float32; prompt {_PROMPT.value}, "
          f"{_NEW.value} new tokens, median of {_REPEATS.value}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'ms/token (1/4 budget, full)':>28} {'same tokens':>11}")
    for batch in map(int, _BATCHES.value):
        prompts = rng.integers(0, _VOCAB.value, (batch, _PROMPT.value)).tolist()

        def ours(new_tokens=_NEW.value):
            return generate(config, params, prompts, max_new_tokens=new_tokens).tokens

        def theirs():
            with torch.no_grad():
                return hf_model.generate(
                    torch.tensor(prompts), attention_mask=torch.ones(batch, _PROMPT.value, dtype=torch.long),
                    do_sample=False, use_cache=True, max_new_tokens=_NEW.value, min_new_tokens=_NEW.value,
                    pad_token_id=0,
                )[:, _PROMPT.value:].tolist()

        ours_tokens, their_tokens = ours(), theirs()  # warm-up (compilation) and the comparison
        quarter = max(1, _NEW.value // 4)
        ours(quarter)
        ours_s = _median_seconds(ours, _REPEATS.value)
        quarter_s = _median_seconds(lambda: ours(quarter), _REPEATS.value)
        theirs_s = _median_seconds(theirs, _REPEATS.value)
        new = batch * _NEW.value
        print(
            f"{batch:>5} {new / ours_s:>11,.0f} {new / theirs_s:>9,.0f} {theirs_s / ours_s:>5.1f}x "
            f"{quarter_s / quarter * 1e3:>17.2f}, {ours_s / _NEW.value * 1e3:>7.2f} "
            f"{str(ours_tokens == their_tokens):>11}"
        )


if __name__ == "__main__":
    run_program(main)
