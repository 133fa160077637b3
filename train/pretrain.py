"""Pretraining entry point.

  python -m train.pretrain --config=experiments/quickstart.py --workdir=runs/quickstart \
      --config.train.steps=100

Reads top to bottom: config, mesh, data, state (fresh or restored), loop, final
evaluation, checkpoint, plot and samples. Starting in a workdir that has checkpoints
resumes from the newest readable one, data iterator included.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data import pipeline
from model import flops_per_token, param_counts, sharding
from model.generate import generate
from train import config as config_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, Progress, peak_flops_per_device, plot_loss_curve
from train.optimizer import learning_rate_schedule, make_optimizer
from train.state import abstract_state, create_state
from train.step import batch_sharding, compile_steps

log = logging.getLogger("train")



class NonFiniteError(RuntimeError):
    pass


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into one array sharded over the mesh."""
    sharding_ = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in local.items()}


def evaluate(eval_step, params, corpus, cfg, mesh) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the whole validation split."""
    loss_sum, tokens = 0.0, 0.0
    for batch in pipeline.eval_batches(
        corpus, seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size // jax.process_count(),
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    ):
        out = jax.device_get(eval_step(params, global_batch(batch, mesh)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_bits_per_byte": loss / math.log(2) / corpus.bytes_per_token,
        "eval_tokens": tokens,
    }


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Train as configured; returns the final evaluation metrics."""
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.initialize_distributed()
    is_primary = jax.process_index() == 0
    config_lib.validate(cfg, jax.device_count(), jax.process_count())
    model_config = config_lib.model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), model_config=model_config)

    corpus = pipeline.prepare(cfg.data)
    if corpus.tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_config.vocab_size} does not match the tokenizer's "
            f"vocabulary of {corpus.tokenizer.vocab_size} (config.data)"
        )
    if is_primary:
        (workdir / "config.json").write_text(cfg.to_json(indent=2))
        (workdir / "data_report.json").write_text(json.dumps(corpus.report, indent=2, default=str))

    steps = cfg.train.steps
    optimizer = make_optimizer(cfg.optimizer, steps)
    train_step, eval_step = compile_steps(
        model_config, optimizer, mesh, microbatches=cfg.train.microbatches, z_loss=cfg.train.z_loss
    )
    data_iterator = pipeline.train_iterator(
        corpus, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size // jax.process_count(),
        seed=cfg.train.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
    )
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    restored = checkpointer.restore_latest(abstract_state(model_config, optimizer, mesh), data_iterator)
    if restored is None:
        state = create_state(model_config, optimizer, mesh, cfg.train.seed)
        log.info("starting from scratch in %s", workdir)
    else:
        state, restored_step = restored
        log.info("resumed from the checkpoint at step %d in %s", restored_step, workdir)
    start_step = int(state.step)

    counts = param_counts(model_config)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops_per_step = flops_per_token(model_config, cfg.train.seq_len)["total"] * tokens_per_step
    peak = peak_flops_per_device()
    log.info(
        "model: %s parameters (%s non-embedding); %.3g FLOPs/token; mesh %s; %s devices (%s)",
        f"{counts['total']:,}", f"{counts['nonembedding']:,}",
        flops_per_token(model_config, cfg.train.seq_len)["total"], dict(mesh.shape),
        jax.device_count(), jax.devices()[0].device_kind,
    )

    preempted = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: preempted.set())
    writer = MetricsWriter(workdir, start_step, enabled=is_primary)
    progress = Progress(steps) if is_primary else None
    config_json = json.loads(cfg.to_json())

    schedule = learning_rate_schedule(cfg.optimizer, steps)
    timer = {"step": None, "time": None}

    def report(step, metrics):
        """Check one step's metrics and log them every `train.log_every` steps."""
        values = jax.device_get(metrics)
        if not values["finite"]:
            message = (
                f"non-finite loss or gradients at step {step} "
                f"(loss={values['loss']}, grad_norm={values['grad_norm']})"
            )
            if cfg.train.nonfinite == "stop":
                raise NonFiniteError(message + "; the update was not applied and the run stops")
            log.warning("%s; update skipped (train.nonfinite='skip')", message)
        now = time.perf_counter()
        if timer["step"] is None:  # the first step includes compilation: time from its end
            timer.update(step=step, time=now)
        if step % cfg.train.log_every and step != steps:
            return
        row = {
            "loss": float(values["loss"]), "grad_norm": float(values["grad_norm"]),
            "lr": float(schedule(step - 1)), "nonfinite_steps": int(values["nonfinite_steps"]),
        }
        if step > timer["step"]:
            step_time = (now - timer["time"]) / (step - timer["step"])
            row.update(
                step_time=step_time,
                tokens_per_s=tokens_per_step / step_time,
                flops_per_s=flops_per_step / step_time,
            )
            if peak:
                row["mfu"] = row["flops_per_s"] / (peak * jax.device_count())
            if progress:
                progress.update(step, row["loss"], row["tokens_per_s"], row.get("mfu"), row["flops_per_s"], start_step)
        writer.write(step, row)
        timer.update(step=step, time=now)

    last_eval = {}
    with jax.set_mesh(mesh):
        pending = None  # read a step's metrics only after the next step is dispatched
        for step in range(start_step + 1, steps + 1):
            state, metrics = train_step(state, global_batch(next(data_iterator), mesh))
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            if step % cfg.eval.every_steps == 0 and step != steps:
                report(*pending)
                pending = None
                last_eval = evaluate(eval_step, state.params, corpus, cfg, mesh)
                writer.write(step, last_eval)
                timer.update(step=step, time=time.perf_counter())
            if step % cfg.checkpoint.every_steps == 0 or preempted.is_set():
                checkpointer.save(step, state, data_iterator, config_json)
            if preempted.is_set():
                log.warning("SIGTERM: saved the checkpoint at step %d and stopping", step)
                break
        if pending is not None:
            report(*pending)
        if progress:
            progress.close()

        finished = int(state.step) == steps
        if finished:
            last_eval = evaluate(eval_step, state.params, corpus, cfg, mesh)
            writer.write(steps, last_eval)
            if steps % cfg.checkpoint.every_steps:
                checkpointer.save(steps, state, data_iterator, config_json)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if finished and is_primary:
        plot_loss_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png")
        write_samples(cfg, model_config, state.params, corpus, workdir)
        print(
            f"final validation loss {last_eval['eval_loss']:.4f} nats/token, "
            f"perplexity {last_eval['eval_perplexity']:.2f}, "
            f"{last_eval['eval_bits_per_byte']:.4f} bits/byte; "
            f"files in {workdir}"
        )
    return last_eval


def write_samples(cfg, model_config, params, corpus, workdir: pathlib.Path) -> None:
    """Greedy and temperature-sampled continuations of the configured prompts."""
    tokenizer = corpus.tokenizer
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode(list(cfg.sample.prompts))]
    params = jax.device_get(params)
    lines = []
    for temperature in (0.0, cfg.sample.temperature):
        outputs = generate(
            model_config, params, prompts, max_new_tokens=cfg.sample.max_new_tokens,
            temperature=temperature, rng=jax.random.key(cfg.train.seed), eos_id=tokenizer.eos_id,
        )
        label = "greedy" if temperature == 0.0 else f"temperature {temperature}"
        for prompt, out in zip(cfg.sample.prompts, tokenizer.decode(outputs)):
            lines.append(f"--- {label} | prompt {prompt!r}\n{prompt}{out}\n")
    text = "\n".join(lines)
    (workdir / "samples.txt").write_text(text)
    print(text)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Defined here rather than at import, so that sweeps can import `run` beside their own flags.
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
