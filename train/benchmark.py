"""Train-step benchmark: step time, tokens/s, MFU and peak device memory.

  python -m train.benchmark --preset=gpt2-124m --batch_size=32 --seq_len=1024 --dtype=bfloat16

Compile time is reported separately from the timed steps. FLOPs per token follow
`model.flops_per_token`: 6 N (N = all parameters but the input embedding tables, the head
counted at the tokenizer's vocabulary, not the padded one) plus the attention term 12 L d T.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import flags

import model
from model import sharding
from train.cli import given_flags, run_program
from train.metrics import peak_flops_per_device
from train.optimizer import make_optimizer
from train.state import abstract_state, create_state
from train.step import compile_steps
from train.timing import in_turns, pipelined_intervals

_PRESET = flags.DEFINE_string("preset", "gpt2-124m", "Model preset (model.PRESETS).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch, in sequences.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Remat policy.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scan over layers.")
_ATTENTION = flags.DEFINE_enum("attention", "auto", model.attention.IMPLEMENTATIONS, "Attention kernel (model/attention.py).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary (0: the preset's).", lower_bound=0)
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile against the abstract state and print its memory, without running "
    "(no buffers are allocated: a model larger than the device can be sized)."
)
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 0, "Positions per piece of the chunked head and loss (0: all).", lower_bound=0)
_MICRO = flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after two warm-up steps).")
_DOCS = flags.DEFINE_integer("documents_per_row", 1, "Packed documents per row (segment ids).")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor sizes (-1: the rest).")
PROFILED_STEPS = 3
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", f"After the timed steps, write a jax.profiler trace of {PROFILED_STEPS} more "
    "steps here (TensorBoard's profile tab or Perfetto read it)."
)

for _flag in (_BATCH, _SEQ, _MICRO, _STEPS, _DOCS):
    flags.register_validator(_flag.name, lambda value: value >= 1, message="must be at least 1")
flags.register_multi_flags_validator(
    ["batch_size", "microbatches"],
    lambda f: f["batch_size"] % f["microbatches"] == 0,
    message="--batch_size must be a multiple of --microbatches",
)
flags.register_multi_flags_validator(
    ["compile_only", "profile_dir"],
    lambda f: not (f["compile_only"] and f["profile_dir"]),
    message="--profile_dir traces steps, and --compile_only runs none",
)
flags.register_multi_flags_validator(
    ["seq_len", "documents_per_row"],
    lambda f: f["documents_per_row"] <= f["seq_len"],
    message="--documents_per_row must be at most --seq_len",
)


def refuse_flags(*names: str) -> None:
    """Stop, naming them, when flags of this module that a program built on it does not use
    were given."""
    given = given_flags(*names)
    if given:
        raise ValueError(f"{', '.join(given)}: not used by this program")


def device_memory_bytes() -> int | None:
    """Memory of one device: the accelerator's, or for the CPU backend the host's RAM shared
    by this host's devices (several when XLA is told to make them)."""
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is None and device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(jax.local_devices())
    return limit


def check_fits(compiled) -> None:
    """Refuse a compiled step whose buffers exceed the device's memory, before running it."""
    analysis = compiled.memory_analysis()
    limit = device_memory_bytes()
    if analysis is None or limit is None:
        return
    needed = (
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
    )
    if needed > limit:
        raise ValueError(
            f"the compiled step needs {needed / 2**30:,.1f} GiB per device and the device has "
            f"{limit / 2**30:,.1f} GiB; lower --batch_size or --seq_len, or use --remat or "
            "--microbatches"
        )


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, documents_per_row: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    doc_len = seq_len // documents_per_row
    slots = np.arange(seq_len)
    segment_ids = np.minimum(slots // doc_len, documents_per_row - 1) + 1
    positions = slots - (segment_ids - 1) * doc_len
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.broadcast_to(segment_ids, (batch_size, seq_len)).astype(np.int32),
        "positions": np.broadcast_to(positions, (batch_size, seq_len)).astype(np.int32),
    }


def time_steps(step, state, batch, steps: int, profile_dir: str = ""):
    """(compile seconds, per-step seconds, the compiled step's memory analysis) of a compiled
    update: two warm-up steps, then `steps` timed ones, run as training runs them
    (`pipelined_intervals`); with `profile_dir`, then a trace of PROFILED_STEPS more there."""
    return time_interleaved([(step, state, batch)], steps, profile_dir)[0]


def time_interleaved(updates, steps: int, profile_dir: str = ""):
    """`time_steps` of several (step, state, batch) updates at once. After each one's compile
    and warm-up (`warmed_up`) they take turns (`in_turns`), so that drift in the machine's
    speed falls on all of them alike (back-to-back runs on the 2-core CPU differ by up to
    30%): two steps each per round, the second timed."""
    runs = [warmed_up(*update) for update in updates]
    rounds, per_round = (1, steps) if len(runs) == 1 else (steps, 1)
    timers = [
        functools.partial(pipelined_intervals, dispatch, jax.block_until_ready, per_round) for _, _, dispatch in runs
    ]
    times = [sum(rounds_of_one, []) for rounds_of_one in in_turns(timers, rounds)]
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _, _, dispatch in runs:
                for _ in range(PROFILED_STEPS):
                    metrics = dispatch()
                jax.block_until_ready(metrics)
    return [(compile_s, measured, compiled.memory_analysis()) for (compile_s, compiled, _), measured in zip(runs, times)]


def warmed_up(step, state, batch):
    """(compile seconds, the compiled step, `dispatch`) of a jitted update compiled for (state,
    batch), refused if its buffers exceed the device's memory (`check_fits`), then run twice.
    `dispatch()` runs one more step on the state it holds and returns the step's metrics; the
    batch is placed on the devices once, as the step's input sharding asks."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    check_fits(compiled)
    batch = jax.device_put(batch, compiled.input_shardings[0][1])
    held = [state]

    def dispatch():
        held[0], metrics = compiled(held[0], batch)
        return metrics

    for _ in range(2):
        metrics = dispatch()
    jax.block_until_ready(metrics)
    return compile_s, compiled, dispatch


def main(argv):
    del argv
    config = model.get_config(
        _PRESET.value, dtype=_DTYPE.value, remat=_REMAT.value, scan_layers=_SCAN.value, attention=_ATTENTION.value,
        max_seq_len=max(_SEQ.value, model.get_config(_PRESET.value).max_seq_len),
        vocab_size=_VOCAB.value or model.get_config(_PRESET.value).vocab_size,
    )
    mesh = sharding.make_mesh([int(s) for s in _MESH.value], model_config=config)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if (_BATCH.value // _MICRO.value) % data_parallel:
        raise ValueError(
            f"--batch_size={_BATCH.value} in {_MICRO.value} micro-batch(es) does not split over "
            f"the {data_parallel} data-parallel devices of mesh {dict(mesh.shape)}"
        )
    opt_cfg = ml_collections.ConfigDict(dict(
        lr=3e-4, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine", decay_fraction=0.2,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
    ))
    optimizer = make_optimizer(opt_cfg, total_steps=1000)
    train_step, _ = compile_steps(
        config, optimizer, mesh, microbatches=_MICRO.value, z_loss=0.0, loss_chunk=_LOSS_CHUNK.value
    )
    batch = synthetic_batch(_BATCH.value, _SEQ.value, config.vocab_size, _DOCS.value)
    vocabulary = f"vocabulary {config.vocab_size:,} (stored {config.padded_vocab_size:,})"

    if _COMPILE_ONLY.value:
        abstract = abstract_state(optimizer, mesh, model.abstract_params(config))
        with jax.set_mesh(mesh):
            memory = train_step.lower(abstract, batch).compile().memory_analysis()
        print(f"model              {_PRESET.value}, {vocabulary}: {model.param_counts(config)['total']:,} params")
        print(f"batch              {_BATCH.value} x {_SEQ.value} tokens; attention {model.attention.resolve(config.attention, _SEQ.value)}; loss chunk {_LOSS_CHUNK.value or 'none'}")
        print_memory(memory)
        return
    with jax.set_mesh(mesh):
        state = create_state(config, optimizer, mesh, seed=0)
        compile_s, times, compiled_memory = time_steps(train_step, state, batch, _STEPS.value, _PROFILE_DIR.value)

    step_time = statistics.median(times)
    tokens = _BATCH.value * _SEQ.value
    flops = model.flops_per_token(config, _SEQ.value)
    peak = peak_flops_per_device()
    achieved = flops["total"] * tokens / step_time
    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
    counts = model.param_counts(config)
    print(f"device             {jax.device_count()} x {device.device_kind}; mesh {dict(mesh.shape)}")
    print(f"model              {_PRESET.value}, {vocabulary}: {counts['total']:,} params ({counts['nonembedding']:,} non-embedding), {config.dtype} compute, remat {config.remat}")
    print(f"attention          {model.attention.resolve(config.attention, _SEQ.value)}; loss chunk {_LOSS_CHUNK.value or 'none'}")
    print(f"batch              {_BATCH.value} x {_SEQ.value} tokens, {_MICRO.value} micro-batch(es), {_DOCS.value} document(s)/row")
    print(f"FLOPs/token        {flops['total']:.4g} = 6N {flops['total'] - flops['attention']:.4g} + attention 12LdT {flops['attention']:.4g}")
    print(f"compile            {compile_s:.1f} s")
    print(f"step time          {step_time * 1e3:.1f} ms (median of {len(times)}; min {min(times) * 1e3:.1f})")
    print(f"tokens/s           {tokens / step_time:,.0f}")
    print(f"achieved           {achieved / 1e12:.2f} TFLOP/s")
    print(f"MFU                {achieved / (peak * jax.device_count()):.1%}" if peak else "MFU                n/a (no peak FLOP/s known for this device)")
    print(f"peak memory        {memory / 2**30:.2f} GiB" if memory else "peak memory        n/a (not reported by this backend)")
    print_memory(compiled_memory)
    if _PROFILE_DIR.value:
        print(f"profile            {PROFILED_STEPS} steps traced under {_PROFILE_DIR.value}")


def print_memory(analysis) -> None:
    """The compiled step's buffers per device, from XLA's memory analysis."""
    if analysis is None:
        return
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    print(
        f"compiled step      arguments {gib(analysis.argument_size_in_bytes)}, temporaries "
        f"{gib(analysis.temp_size_in_bytes)}, outputs {gib(analysis.output_size_in_bytes)} "
        f"({gib(analysis.alias_size_in_bytes)} aliased to the donated arguments), per device"
    )


if __name__ == "__main__":
    run_program(main)
