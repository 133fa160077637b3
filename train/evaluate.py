"""Loss, perplexity and bits per byte of a run's newest checkpoint on any text files.

    python -m train.evaluate --workdir=runs/quickstart --paths=held_out/ --paths=more.jsonl

The files are read as the data pipeline reads them (text, JSONL or Parquet by extension; one
document per text file, or per blank-line paragraph with --text_unit=paragraph), without its
cleaning: the text is scored as it is. Each document becomes [BOS] tokens [EOS] under the
run's tokenizer and is packed into rows of the run's `train.seq_len` exactly as validation
batches are; the run's loss function scores them. Bits per byte are the summed loss over the
UTF-8 bytes of the documents, in base 2. Works for pretraining and post-training workdirs
(LoRA adapters merged).
"""

from __future__ import annotations

import math
import pathlib
import tempfile

import jax
import ml_collections
from absl import flags
from etils import epath

import model
from align import source
from data import pipeline, sources, token_cache
from model import sharding
from train import workdir as workdir_lib
from train.cli import run_program
from train.loop import global_batch
from train.state import tree_shardings
from train.step import compile_eval_step, language_model_loss

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir: its newest checkpoint is scored.", required=True)
_PATHS = flags.DEFINE_multi_string("paths", None, "Files, directories or globs to score.", required=True)
_TEXT_UNIT = flags.DEFINE_enum("text_unit", "file", sources.TEXT_UNITS, "Text files: one document per file or paragraph.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL key or Parquet column holding the text.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per batch (0: the run's eval.batch_size).")


def read_texts(paths: list[str], text_unit: str = "file", text_field: str = "text") -> list[str]:
    cfg = pipeline.default_config()
    cfg.update(source="files", paths=tuple(paths), max_bytes=0, text_unit=text_unit, text_field=text_field)
    documents, report = sources.read_documents(cfg)
    texts = [d.text for d in documents if d.text]  # an empty one has no bytes to score
    if not texts:
        raise ValueError(f"--paths={list(paths)}: no documents with text ({report.summary()})")
    return texts


def evaluate(workdir: epath.PathLike, texts: list[str], batch_size: int = 0) -> dict[str, float]:
    """{'loss' (nats per token), 'perplexity', 'bits_per_byte', 'tokens', 'documents'}."""
    start = source.from_workdir(workdir, setting="--workdir")
    run = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
    batch_size = batch_size or run.eval.batch_size
    mesh = sharding.make_mesh((-1, 1, 1), model_config=start.model_config)
    # Each process reads its share of the rows, and the global batch splits over the devices.
    if batch_size % math.lcm(mesh.shape["data"], jax.process_count()):
        raise ValueError(
            f"--batch_size={batch_size} does not split over {mesh.shape['data']} devices and "
            f"{jax.process_count()} processes"
        )
    params = start.load_params(mesh)
    params_shardings = tree_shardings(model.abstract_params(start.model_config), mesh)
    eval_step = compile_eval_step(language_model_loss(start.model_config), mesh, params_shardings)
    documents = start.tokenizer.encode_arrays(texts, add_bos=True, add_eos=True)
    with tempfile.TemporaryDirectory() as directory:
        shard = token_cache.write_shard(
            pathlib.Path(directory) / "shards", "val", documents, token_cache.token_dtype(start.tokenizer.vocab_size)
        )
        manifest = {"splits": {"val": {"shards": [shard]}}}
        corpus = pipeline.Corpus(pathlib.Path(directory), manifest, start.tokenizer, config=None)
        loss_sum, tokens = 0.0, 0.0
        with jax.set_mesh(mesh):
            for batch in pipeline.eval_batches(
                corpus, seq_len=run.train.seq_len, batch_size=batch_size // jax.process_count(),
                shard_index=jax.process_index(), shard_count=jax.process_count(),
            ):
                sums = jax.device_get(eval_step(params, {}, global_batch(batch, mesh)))
                loss_sum += float(sums["loss"])
                tokens += float(sums["weight"])
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "loss": loss_sum / tokens,
        "perplexity": math.exp(min(loss_sum / tokens, 50.0)),
        "bits_per_byte": loss_sum / math.log(2) / text_bytes,
        "tokens": tokens,
        "documents": len(texts),
    }


def main(argv):
    del argv
    texts = read_texts(_PATHS.value, _TEXT_UNIT.value, _TEXT_FIELD.value)
    result = evaluate(_WORKDIR.value, texts, _BATCH.value)
    print(
        f"{_WORKDIR.value}: loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
        f"{result['bits_per_byte']:.4f} bits/byte over {result['documents']:,} documents, "
        f"{result['tokens']:,.0f} tokens"
    )


if __name__ == "__main__":
    run_program(main)
