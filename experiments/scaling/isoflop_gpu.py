"""IsoFLOP sweep for one GPU (or a pod slice): 4 budgets from 1e17 to 3e18 FLOPs, sizes from
20M to 1.2B parameters, context 1024, bfloat16: 24 runs (4, 6, 7 and 7 per budget; the runs
below `min_steps` are left out). Point the data at a real corpus:
--config.train.data.source=files --config.train.data.paths=/data/corpus/*.parquet

  python -m experiments.scaling.sweep --config=experiments/scaling/isoflop_gpu.py --workdir=runs/isoflop_gpu
"""

import ml_collections

from train.config import base_config

VOCAB = 32768


def get_config():
    c = ml_collections.ConfigDict()
    c.kind = "isoflop"
    c.budgets = (1e17, 3e17, 1e18, 3e18)
    c.sizes = (2e7, 4e7, 8e7, 1.6e8, 3.2e8, 6.4e8, 1.2e9)
    c.accounting = "model"
    c.min_steps = 200
    c.warmup_fraction = 0.05
    c.shape = ml_collections.ConfigDict(dict(
        vocab_size=VOCAB, max_seq_len=1024, head_dim=64, aspect_ratio=64.0, count="total",
        dtype="bfloat16", remat="dots",
    ))
    c.train = base_config()
    c.train.data.tokenizer.vocab_size = VOCAB
    c.train.train.batch_size = 256
    c.train.train.seq_len = 1024
    c.train.optimizer.lr = 1e-3
    c.train.optimizer.schedule = "cosine"
    c.train.eval.batch_size = 64
    return c
