"""The main job: a small Llama-style model trained on the built-in corpus in minutes on a CPU.

  python -m train.pretrain --config=experiments/quickstart.py --workdir=runs/quickstart
"""

from train.config import base_config, model_fields

VOCAB = 4096


def get_config():
    c = base_config()
    c.model = model_fields(
        "llama-tiny", vocab_size=VOCAB, d_model=192, n_layers=4, n_heads=3, n_kv_heads=1,
        d_ff=512, max_seq_len=256,
    )
    c.data.tokenizer.vocab_size = VOCAB
    c.data.max_bytes = 20_000_000
    # About 1% of files (some 200 kB) for validation: evaluated in full, in seconds.
    c.data.val_fraction = 0.01
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.log_every = 10
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.schedule = "cosine"
    c.eval.every_steps = 100
    c.eval.batch_size = 32
    c.checkpoint.every_steps = 100
    return c
