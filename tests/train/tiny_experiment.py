"""A tiny experiment for end-to-end trainer tests, importable by a trainer subprocess."""

import argparse
import collections
import email
import json
import logging
import pathlib
import typing
import unittest

from train import config as config_lib

STEPS = 60


def tiny_config(corpus_dir, cache_dir, **train_overrides):
    cfg = config_lib.base_config()
    cfg.model = config_lib.model_fields(
        "llama-tiny", vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
        d_ff=64, max_seq_len=64,
    )
    cfg.data.source = "files"
    cfg.data.paths = (str(corpus_dir),)
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.tokenizer.vocab_size = 512
    cfg.data.val_fraction = 0.25
    # Batch 8: one sequence per fake CPU device on the data axis.
    cfg.train.update({"steps": STEPS, "batch_size": 8, "seq_len": 32, "log_every": 1, **train_overrides})
    cfg.optimizer.update(lr=3e-3, warmup_steps=5)
    cfg.eval.update(every_steps=25, batch_size=8)
    cfg.checkpoint.update(every_steps=10, keep=2)
    cfg.sample.update(prompts=("import ",), max_new_tokens=8)
    return cfg


def write_tiny_corpus(directory: pathlib.Path) -> pathlib.Path:
    """24 text files of real Python source (slices of standard-library modules)."""
    modules = [email, json, logging, argparse, collections, pathlib, typing, unittest] * 3
    for i, module in enumerate(modules):
        text = pathlib.Path(module.__file__).read_text()
        (directory / f"doc{i:02d}.txt").write_text(text[i * 500 : i * 500 + 6000])
    return directory
