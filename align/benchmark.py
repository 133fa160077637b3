"""Post-training updates beside the pretraining update on the same model and tokens per step.

  python -m align.benchmark --preset=llama-tiny --batch_size=16 --seq_len=256 --dtype=float32

Every update sees batch_size x seq_len tokens: pretraining and SFT as [B, T] rows, the
preference methods as B/2 pairs of [2, T]. DPO with a cached reference costs one forward and
backward pass over its 2 x B/2 rows, the same work as a pretraining step; an online reference
adds a forward pass (about a third more FLOPs). The updates take turns, two steps each per
round with the second timed (`train.benchmark.time_interleaved`). Prints the median step
time, tokens/s, the ratio to pretraining, and the compiled step's temporary memory.
"""

from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import numpy as np
from absl import flags

import model
from align.config import method_config as cfg
from align import dpo, sft, trees
from model import sharding
from train.benchmark import refuse_flags, synthetic_batch, time_interleaved
from train.cli import run_program
from train.optimizer import make_optimizer
from train.state import create_state, init_state, state_shardings
from train.step import compile_steps, compile_train_step

# The flags are train.benchmark's (--preset, --batch_size, --seq_len, --steps; --dtype,
# --remat, --scan_layers, --attention and --vocab_size as there); a pair counts as two
# sequences of the batch.
FLAGS = flags.FLAGS


def _preference_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """B/2 pairs, prompts a quarter of each row, responses to the end."""
    rows = synthetic_batch(batch_size, seq_len, vocab_size, 1)
    rows["loss_mask"] = (np.arange(seq_len) >= seq_len // 4).astype(np.int32)[None].repeat(batch_size, 0)
    pairs = {k: v.reshape(batch_size // 2, 2, seq_len) for k, v in rows.items()}
    pairs["reference_logps"] = np.full((batch_size // 2, 2), -100.0, np.float32)
    return pairs


def _method_step(cfg, config, mesh, loss_fn_builder):
    optimizer = make_optimizer(cfg.optimizer, total_steps=1000)
    shardings = state_shardings(optimizer, mesh, *trees.boxed_trees(cfg, config))
    step = compile_train_step(loss_fn_builder(cfg, config), optimizer, mesh, shardings, microbatches=1)
    base = model.init_params(config, jax.random.key(0))
    params, frozen = nn.meta.unbox(trees.trees(cfg, config, base, jax.random.key(1)))
    state = jax.jit(lambda p, f: init_state(p, optimizer, 0, f), out_shardings=shardings)(params, frozen)
    return step, state


def main(argv):
    del argv
    refuse_flags("compile_only", "loss_chunk", "mesh", "microbatches", "documents_per_row", "profile_dir")
    preset = model.get_config(FLAGS.preset)
    config = preset.replace(
        dtype=FLAGS.dtype, remat=FLAGS.remat, scan_layers=FLAGS.scan_layers, attention=FLAGS.attention,
        vocab_size=FLAGS.vocab_size or preset.vocab_size,
        max_seq_len=max(FLAGS.seq_len, preset.max_seq_len),
    )
    mesh = sharding.make_mesh((-1, 1, 1), model_config=config)
    B, T = FLAGS.batch_size, FLAGS.seq_len
    rows = synthetic_batch(B, T, config.vocab_size, 1)
    sft_rows = {**rows, "loss_mask": (np.arange(T) >= T // 4).astype(np.int32)[None].repeat(B, 0)}
    pairs = _preference_batch(B, T, config.vocab_size)

    results = []
    with jax.set_mesh(mesh):
        optimizer = make_optimizer(cfg("sft").optimizer, total_steps=1000)
        pretrain_step, _ = compile_steps(config, optimizer, mesh, microbatches=1, z_loss=0.0)
        state = create_state(config, optimizer, mesh, seed=0)
        cases = [("pretraining", pretrain_step, state, rows)]
        for name, c, builder, batch in (
            ("sft", cfg("sft"), sft.loss_fn, sft_rows),
            ("dpo, cached reference", cfg("dpo", dpo=dict(reference="cached")), dpo.loss_fn, pairs),
            ("dpo, online reference", cfg("dpo", dpo=dict(reference="online")), dpo.loss_fn, pairs),
            ("dpo, LoRA r=8, cached", cfg("dpo", dpo=dict(reference="cached"), lora=dict(rank=8)), dpo.loss_fn, pairs),
        ):
            cases.append((name, *_method_step(c, config, mesh, builder), batch))
        measured = time_interleaved([case[1:] for case in cases], FLAGS.steps)
        for (name, *_), (_, times, compiled_memory) in zip(cases, measured):
            results.append((name, statistics.median(times), compiled_memory.temp_size_in_bytes))

    counts = model.param_counts(config)
    print(f"device   {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"model    {FLAGS.preset}: {counts['total']:,} params; {B} x {T} tokens per update")
    print(f"{'update':24s} {'step ms':>9s} {'tokens/s':>10s} {'vs pretraining':>15s} {'temp MiB':>9s}")
    base_time = results[0][1]
    for name, step_time, temp in results:
        print(f"{name:24s} {step_time * 1e3:9.1f} {B * T / step_time:10,.0f} {base_time / step_time:15.2f} {temp / 2**20:9.1f}")


if __name__ == "__main__":
    run_program(main)
