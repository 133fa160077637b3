"""The experiment config schema (defaults for every key) and its validation.

Experiments under `experiments/` start from `base_config()` and change what they need;
`validate` runs before anything is compiled and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

import model
from data import pipeline
from model import sharding
from train.optimizer import SCHEDULES


def model_fields(preset: str, **overrides) -> ml_collections.ConfigDict:
    """All ModelConfig fields of a preset, as a ConfigDict that flags can override."""
    config = model.get_config(preset, **overrides)
    fields = dataclasses.asdict(config)
    if config.head_dim == config.d_model // config.n_heads:
        fields["head_dim"] = 0  # derived, so overriding d_model or n_heads keeps it consistent
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_fields("llama-tiny")
    c.data = pipeline.default_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32  # global, in sequences
    c.train.seq_len = 256
    c.train.microbatches = 1  # gradient accumulation inside the compiled step
    c.train.seed = 0
    c.train.z_loss = 0.0
    # Positions per piece of the chunked head and loss (model/logprobs.py); 0: all at once,
    # fastest while the [B, T, V] float32 logits fit beside the activations.
    c.train.loss_chunk = 0
    c.train.log_every = 10
    c.train.nonfinite = "stop"  # "stop" | "skip" (skip the update and count it)
    # (first, last): trace these steps with jax.profiler into WORKDIR/tensorboard, for
    # TensorBoard's profile tab; () for none.
    c.train.profile_steps = ()
    # A Weights & Biases project to log the metrics, the config and the samples to as well
    # (`pip install -e ".[wandb]"`); "" for none.
    c.train.wandb_project = ""

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-4
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.decay_fraction = 0.2  # WSD: share of steps spent decaying
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 200
    c.eval.batch_size = 32

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # A Hugging Face model directory (config.json + safetensors + tokenizer.model) to start
    # from: its architecture replaces config.model (dtype, param_dtype, remat, scan_layers and
    # attention stay), its SentencePiece model becomes data.tokenizer.path.
    c.init = ml_collections.ConfigDict({"from_hf": ""})

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ("def ", "import numpy as np\n", "class ")
    c.sample.max_new_tokens = 64
    c.sample.temperature = 0.8
    return c


def model_config(cfg: ml_collections.ConfigDict) -> model.ModelConfig:
    return model.ModelConfig(**cfg.model.to_dict())


def validate(cfg: ml_collections.ConfigDict, n_devices: int, n_processes: int) -> None:
    """Refuse inconsistent configs before any compilation; errors name the key."""

    def require(ok: bool, key: str, message: str):
        if not ok:
            raise ValueError(f"config.{key}={_get(cfg, key)!r}: {message}")

    model_config(cfg)  # ModelConfig names bad model.* values itself
    t = cfg.train
    require(t.steps > 0, "train.steps", "must be positive")
    require(t.batch_size > 0, "train.batch_size", "must be positive")
    require(cfg.eval.batch_size > 0, "eval.batch_size", "must be positive")
    require(t.seq_len > 0, "train.seq_len", "must be positive")
    require(
        t.seq_len <= cfg.model.max_seq_len, "train.seq_len",
        f"exceeds the model's maximum sequence length model.max_seq_len={cfg.model.max_seq_len}",
    )
    require(t.microbatches > 0, "train.microbatches", "must be positive")
    require(t.loss_chunk >= 0, "train.loss_chunk", "must be >= 0 (0: the whole sequence at once)")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(cfg.eval.every_steps > 0, "eval.every_steps", "must be positive")
    require(
        cfg.optimizer.warmup_steps <= t.steps, "optimizer.warmup_steps",
        f"exceeds the run's train.steps={t.steps}; the learning rate would never reach its peak",
    )
    if "sample" in cfg:  # pretraining's end-of-run samples
        require(
            0 < cfg.sample.max_new_tokens < cfg.model.max_seq_len, "sample.max_new_tokens",
            f"must be positive and leave room for the prompt in model.max_seq_len={cfg.model.max_seq_len}",
        )
    require(t.nonfinite in ("stop", "skip"), "train.nonfinite", "expected 'stop' or 'skip'")
    profile = tuple(t.profile_steps)
    require(
        profile == () or (
            len(profile) == 2 and all(isinstance(s, int) for s in profile) and 1 <= profile[0] <= profile[1] <= t.steps
        ),
        "train.profile_steps", f"expected () or (first, last), step numbers with 1 <= first <= last <= train.steps={t.steps}",
    )
    require(cfg.optimizer.schedule in SCHEDULES, "optimizer.schedule", f"expected one of {SCHEDULES}")
    if cfg.optimizer.schedule == "wsd":
        after_warmup = t.steps - cfg.optimizer.warmup_steps
        require(
            0 < round(cfg.optimizer.decay_fraction * t.steps) <= after_warmup, "optimizer.decay_fraction",
            f"must decay over at least one and at most the {after_warmup} steps after warmup "
            f"(train.steps={t.steps}, optimizer.warmup_steps={cfg.optimizer.warmup_steps})",
        )
    require(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
    require(cfg.checkpoint.keep > 0, "checkpoint.keep", "must be positive")

    for axis in sharding.MESH_AXES:
        require(cfg.mesh[axis] == -1 or cfg.mesh[axis] > 0, f"mesh.{axis}", "must be positive or -1")
    try:
        mesh_shape = sharding.mesh_shape(cfg.mesh.to_dict(), n_devices)
    except ValueError as error:
        raise ValueError(f"config.mesh={cfg.mesh.to_dict()}: {error}") from None
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    require(
        t.batch_size % t.microbatches == 0, "train.batch_size",
        f"not divisible by train.microbatches={t.microbatches}",
    )
    micro = t.batch_size // t.microbatches
    require(
        micro % batch_shards == 0, "train.batch_size",
        f"micro-batch of {micro} sequences is not divisible by the data x fsdp mesh axes "
        f"({mesh_shape['data']} x {mesh_shape['fsdp']} = {batch_shards})",
    )
    require(
        t.batch_size % n_processes == 0, "train.batch_size",
        f"not divisible by the number of processes ({n_processes})",
    )
    require(
        cfg.eval.batch_size % math.lcm(batch_shards, n_processes) == 0, "eval.batch_size",
        f"not divisible by the data x fsdp mesh axes ({batch_shards}) and processes ({n_processes})",
    )
    sharding.check_divisible(model_config(cfg), mesh_shape)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg
