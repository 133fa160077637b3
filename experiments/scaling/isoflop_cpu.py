"""IsoFLOP sweep that runs on a 2-core CPU in about 45 minutes: 3 budgets x 5 sizes of
small Llama-style models on the built-in corpus.

  python -m experiments.scaling.sweep --config=experiments/scaling/isoflop_cpu.py --workdir=runs/isoflop_cpu
  python -m experiments.scaling.fit --input=runs/isoflop_cpu/runs.csv --approach=2
"""

import ml_collections

from experiments.quickstart import get_config as quickstart

VOCAB = 1024


def get_config():
    c = ml_collections.ConfigDict()
    c.kind = "isoflop"
    c.budgets = (1e12, 2e12, 4e12)  # FLOPs, model accounting (6N + 12 L d T)
    c.sizes = (7e4, 1.4e5, 2.8e5, 5.6e5, 1.12e6)  # target total parameters
    c.accounting = "model"
    c.min_steps = 20
    c.warmup_fraction = 0.1
    # Small widths need small heads and a smaller aspect ratio to give distinct shapes.
    c.shape = ml_collections.ConfigDict(dict(
        vocab_size=VOCAB, max_seq_len=256, head_dim=16, aspect_ratio=16.0, count="total",
    ))
    c.train = quickstart()
    c.train.data.tokenizer.vocab_size = VOCAB
    c.train.train.batch_size = 16
    c.train.train.seq_len = 128
    c.train.optimizer.lr = 3e-3
    c.train.optimizer.schedule = "cosine"
    c.train.sample.max_new_tokens = 16
    return c
