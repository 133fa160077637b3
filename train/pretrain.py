"""Pretraining entry point.

  python -m train.pretrain --config=experiments/quickstart.py --workdir=runs/quickstart \
      --config.train.steps=100

Reads top to bottom: config, mesh, data (the token shards `python -m data.prepare` made for
`config.data`), the compiled steps, then the shared loop (`train/loop.py`: restore or create
the state, train, evaluate, checkpoint), then the loss plot and samples. Starting in a workdir
that has checkpoints resumes from the newest readable one, data iterator included; a
checkpoint saved on other data (another manifest digest) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

import jax
import ml_collections

import model
from data import pipeline, prepare
from model import flops_per_token, param_counts, sharding
from model.generate import generate
from train import config as config_lib
from train import cli, loop
from train import workdir as workdir_lib
from train.loop import NonFiniteError, global_batch
from train.metrics import plot_loss_curve
from train.optimizer import learning_rate_schedule, make_optimizer
from train.state import abstract_state, create_state
from train.step import compile_steps

log = logging.getLogger("train")

__all__ = ["NonFiniteError", "run"]


def evaluate(eval_step, params, corpus, cfg, mesh) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the whole validation split."""
    loss_sum, tokens = 0.0, 0.0
    for batch in pipeline.eval_batches(
        corpus, seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size // jax.process_count(),
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    ):
        out = jax.device_get(eval_step(params, {}, global_batch(batch, mesh)))
        loss_sum += float(out["loss"])
        tokens += float(out["weight"])
    loss = loss_sum / max(tokens, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        # Every target of the split is scored, each document's EOS included: the nats of the
        # whole text over its UTF-8 bytes, as train/evaluate.py counts them.
        "eval_bits_per_byte": loss_sum / math.log(2) / corpus.val_bytes,
        "eval_tokens": tokens,
    }


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Train as configured; returns the final evaluation metrics."""
    loop.begin_run()
    is_primary = jax.process_index() == 0
    imported = None
    if cfg.init.from_hf:
        cfg, imported = _from_hf(cfg)
    config_lib.validate(cfg, jax.device_count(), jax.process_count())
    model_config = config_lib.model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), model_config=model_config)

    corpus = _prepared_corpus(cfg.data)
    if corpus.tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_config.vocab_size} does not match the tokenizer's "
            f"vocabulary of {corpus.tokenizer.vocab_size} (config.data)"
        )
    longest_prompt = 1 + max(map(len, corpus.tokenizer.encode(list(cfg.sample.prompts))), default=0)
    if longest_prompt + cfg.sample.max_new_tokens > model_config.max_seq_len:
        raise ValueError(
            f"config.sample.max_new_tokens={cfg.sample.max_new_tokens}: with the longest of "
            f"config.sample.prompts ({longest_prompt} tokens) it exceeds "
            f"model.max_seq_len={model_config.max_seq_len}"
        )
    workdir = workdir_lib.prepare(cfg, workdir)
    if is_primary:
        (workdir / "data_report.json").write_text(json.dumps(corpus.report, indent=2, default=str))
        corpus.tokenizer.save(workdir / "tokenizer.model")  # what runs starting from this one read

    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)
    train_step, eval_step = compile_steps(
        model_config, optimizer, mesh, microbatches=cfg.train.microbatches, z_loss=cfg.train.z_loss,
        loss_chunk=cfg.train.loss_chunk,
    )
    counts = param_counts(model_config)
    flops = flops_per_token(model_config, cfg.train.seq_len)["total"]
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    log.info(
        "model: %s parameters (%s non-embedding); %.3g FLOPs/token; mesh %s; %s devices (%s)",
        f"{counts['total']:,}", f"{counts['nonembedding']:,}", flops, dict(mesh.shape),
        jax.device_count(), jax.devices()[0].device_kind,
    )
    job = loop.Job(
        train_step=train_step,
        batches=pipeline.train_iterator(
            corpus, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size // jax.process_count(),
            seed=cfg.train.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
        ),
        new_state=lambda: create_state(model_config, optimizer, mesh, cfg.train.seed, imported),
        abstract_state=abstract_state(optimizer, mesh, model.abstract_params(model_config)),
        tokens_per_step=tokens_per_step,
        learning_rate=learning_rate_schedule(cfg.optimizer, cfg.train.steps),
        flops_per_step=flops * tokens_per_step,
        evaluate=lambda state: evaluate(eval_step, state.params, corpus, cfg, mesh),
        samples=lambda state: write_samples(cfg, model_config, state.params, corpus, workdir),
    )
    result = loop.run(cfg, workdir, mesh, job)
    if is_primary:
        plot_loss_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png")
        final = result.last_eval
        print(
            f"final validation loss {final['eval_loss']:.4f} nats/token, "
            f"perplexity {final['eval_perplexity']:.2f}, "
            f"{final['eval_bits_per_byte']:.4f} bits/byte; "
            f"files in {workdir}"
        )
    return result.last_eval


def _prepared_corpus(data_cfg) -> pipeline.Corpus:
    """The corpus `python -m data.prepare` made for `data_cfg`. A single-process run prepares it
    first when it is missing; on several hosts that is left to the preparation command, run
    once (or split over the hosts), not by every training process."""
    try:
        return pipeline.open_corpus(data_cfg)
    except FileNotFoundError:
        if jax.process_count() > 1:
            raise
    prepare.run_in_subprocess(data_cfg)
    return pipeline.open_corpus(data_cfg)


def _from_hf(cfg: ml_collections.ConfigDict):
    """(cfg with the imported architecture and tokenizer, the imported parameters)."""
    directory = pathlib.Path(cfg.init.from_hf)
    tokenizer = directory / "tokenizer.model"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"init.from_hf={str(directory)!r}: no tokenizer.model (SentencePiece) there")
    imported_config, params = model.from_hf(directory)
    cfg = cfg.copy_and_resolve_references()
    kept = {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention")}
    cfg.model = ml_collections.ConfigDict({**dataclasses.asdict(imported_config), **kept})
    if not kept["scan_layers"]:
        params = model.transformer.unrolled(imported_config, params)[1]
    cfg.data.tokenizer.path = str(tokenizer)
    return cfg, params


def write_samples(cfg, model_config, params, corpus, workdir: pathlib.Path) -> str:
    """Greedy and temperature-sampled continuations of the configured prompts. Every process
    takes part in generating (the parameters may be sharded across hosts); the first writes
    samples.txt and prints them. Returns the text, which the loop logs with the metrics."""
    tokenizer = corpus.tokenizer
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode(list(cfg.sample.prompts))]
    lines = []
    for temperature in (0.0, cfg.sample.temperature):
        outputs = generate(
            model_config, params, prompts, max_new_tokens=cfg.sample.max_new_tokens,
            temperature=temperature, rng=jax.random.key(cfg.train.seed), eos_id=tokenizer.eos_id,
        )
        label = "greedy" if temperature == 0.0 else f"temperature {temperature}"
        for prompt, out in zip(cfg.sample.prompts, tokenizer.decode(outputs.tokens)):
            lines.append(f"--- {label} | prompt {prompt!r}\n{prompt}{out}\n")
    text = "\n".join(lines)
    if jax.process_index() == 0:
        (workdir / "samples.txt").write_text(text)
        print(text)
    return text


if __name__ == "__main__":
    cli.main(run)
