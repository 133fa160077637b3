"""Train-step time against nanoGPT for the same GPT-2-family model, in one process.

    python -m experiments.peers --nanogpt=DIR --batch_size=16 --seq_len=128

The model is nanoGPT's own small configuration (its Shakespeare character model: 6 layers, 6
heads, width 384, vocabulary 65; about 10.7M parameters) unless --n_layer, --n_head, --n_embd
and --vocab_size say otherwise.
DIR holds nanoGPT's `model.py` (github.com/karpathy/nanoGPT; it is not part of this project).
Both sides run AdamW on random tokens on one device, the default one (CPU here: both use every
core; torch takes CUDA when it has it, with its fused AdamW), two warm-up steps each, then
`--steps` rounds in which the sides time one step each in turn, so that drift in the machine's
speed (up to 30% between runs on the 2-core CPU) falls on all of them alike; the medians are
printed. A step is timed as a training loop runs it (`train.timing.pipelined_intervals`:
from the completion of the step before it, which it was queued behind), except eager torch
on the CPU, which runs a step to its end as it is called: that call is timed. Weights and
optimizer state are float32 (on a GPU both sides run float32 matmuls as TF32, as nanoGPT's
train.py sets torch to); `--dtype=bfloat16` computes in bfloat16 (nanoGPT under
`torch.autocast`, as its train.py does). nanoGPT runs eager and, with `--torch_compile`, under
`torch.compile`. Needs the `test` extra (torch). On a GPU JAX must leave torch room:
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5.
GPT-2 124M as nanoGPT trains it: --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304.
The README's figures ran under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (README, "Running
experiments").
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import statistics

import jax
import ml_collections
from absl import flags

import model
from model import sharding
from train.benchmark import refuse_flags, synthetic_batch, warmed_up  # also defines the shared flags
from train.cli import run_program
from train.metrics import peak_flops_per_device
from train.optimizer import make_optimizer
from train.state import create_state
from train.step import compile_steps
from train.timing import call_timer, in_turns, pipelined_intervals

_NANOGPT = flags.DEFINE_string("nanogpt", None, "Directory holding nanoGPT's model.py.", required=True)
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "Also time nanoGPT under torch.compile.")
_LAYERS = flags.DEFINE_integer("n_layer", 6, "Layers.")
_HEADS = flags.DEFINE_integer("n_head", 6, "Attention heads.")
_WIDTH = flags.DEFINE_integer("n_embd", 384, "Model width.")
# --batch_size, --seq_len, --steps, --dtype, --attention, --scan_layers and --vocab_size are
# train.benchmark's; a --vocab_size of 0 means nanoGPT's 65.
FLAGS = flags.FLAGS
FLAGS.set_default("dtype", "float32")

_OPTIMIZER = dict(
    lr=3e-4, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine", decay_fraction=0.2,
    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
)


def _vocab_size() -> int:
    return FLAGS.vocab_size or 65


def _config() -> model.ModelConfig:
    return model.get_config(
        "gpt2-124m", dtype=FLAGS.dtype, max_seq_len=max(FLAGS.seq_len, 1024), n_layers=_LAYERS.value,
        n_heads=_HEADS.value, n_kv_heads=_HEADS.value, d_model=_WIDTH.value, d_ff=4 * _WIDTH.value,
        vocab_size=_vocab_size(), attention=FLAGS.attention, scan_layers=FLAGS.scan_layers,
    )


def ours(batch_size: int, seq_len: int):
    """This codebase's step, compiled and warmed up: a function timing one more step."""
    config = _config()
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1], model_config=config)  # nanoGPT's one device
    optimizer = make_optimizer(ml_collections.ConfigDict(_OPTIMIZER), total_steps=1000)
    train_step, _ = compile_steps(config, optimizer, mesh, microbatches=1, z_loss=0.0)
    batch = synthetic_batch(batch_size, seq_len, config.vocab_size, 1)
    with jax.set_mesh(mesh):
        _, _, dispatch = warmed_up(train_step, create_state(config, optimizer, mesh, seed=0), batch)
    return lambda: pipelined_intervals(dispatch, jax.block_until_ready, 1)[0]


def nanogpt(directory: str, batch_size: int, seq_len: int, compiled: bool):
    """nanoGPT's step, warmed up: a function timing one more step."""
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", pathlib.Path(directory) / "model.py")
    nanogpt_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt_model)
    gpt = nanogpt_model.GPT(nanogpt_model.GPTConfig(
        block_size=max(seq_len, 1024), vocab_size=_vocab_size(), n_layer=_LAYERS.value,
        n_head=_HEADS.value, n_embd=_WIDTH.value, dropout=0.0,
    ))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # As nanoGPT's train.py: float32 matmuls as TF32 on the GPU, which XLA's default does too.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gpt.to(device)
    optimizer = gpt.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device)  # fused AdamW on CUDA
    step_model = torch.compile(gpt) if compiled else gpt
    tokens = torch.randint(0, _vocab_size(), (batch_size, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16) if FLAGS.dtype == "bfloat16" else contextlib.nullcontext()
    )

    def step():
        """Dispatch one update; on CUDA return an event its completion sets."""
        with autocast:
            _, loss = step_model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            done = torch.cuda.Event()
            done.record()
            return done
        return None

    wait = lambda done: done is not None and done.synchronize()
    for _ in range(2):
        wait(step())
    if device == "cuda":
        return lambda: pipelined_intervals(step, wait, 1)[0]
    # Eager torch on the CPU runs a step to its end inside step(): the call is timed.
    return call_timer(step)


def main(argv):
    del argv
    refuse_flags("preset", "remat", "loss_chunk", "mesh", "microbatches", "compile_only", "documents_per_row", "profile_dir")
    B, T, steps = FLAGS.batch_size, FLAGS.seq_len, FLAGS.steps
    sides = {
        f"lmx ({model.attention.resolve(FLAGS.attention, T)})": ours(B, T),
        "nanoGPT eager": nanogpt(_NANOGPT.value, B, T, compiled=False),
    }
    if _TORCH_COMPILE.value:
        sides["nanoGPT torch.compile"] = nanogpt(_NANOGPT.value, B, T, compiled=True)
    rows = [(name, statistics.median(times)) for name, times in zip(sides, in_turns(list(sides.values()), steps))]
    shape = f"{_LAYERS.value} layers, {_HEADS.value} heads, width {_WIDTH.value}, vocabulary {_vocab_size()}"
    flops = model.flops_per_token(_config(), T)["total"]
    peak = peak_flops_per_device()
    print(
        f"GPT-2 family, {shape}; {FLAGS.dtype} compute, AdamW; {B} x {T} tokens per step; "
        f"{jax.devices()[0].device_kind}; {flops:.4g} FLOPs/token (model.flops_per_token)"
    )
    for name, seconds in rows:
        speed = rows[1][1] / seconds
        mfu = f"  MFU {flops * B * T / seconds / peak:.1%}" if peak else ""
        print(f"{name:24s} {seconds * 1e3:9.1f} ms/step {B * T / seconds:10,.0f} tok/s  {speed:.2f}x nanoGPT eager{mfu}")


if __name__ == "__main__":
    run_program(main)
