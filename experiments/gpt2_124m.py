"""GPT-2 small (124M) reproduction recipe: context 1024, AdamW (0.9, 0.95), peak lr 6e-4
with 700 warmup steps and cosine decay to 10%, weight decay 0.1, gradient clipping 1.0,
0.5M tokens per step (480 x 1024 would be GPT-3's; nanoGPT uses 524,288 = 512 x 1024).

  python -m train.pretrain --config=experiments/gpt2_124m.py --workdir=runs/gpt2_124m

On one GPU, accumulate: --config.train.microbatches=16 gives 32 sequences per micro-batch.
"""

from train.config import base_config, model_fields

VOCAB = 50257  # GPT-2's; the model stores it padded to 50,304, a multiple of 128 (ModelConfig.padded_vocab_size)


def get_config():
    c = base_config()
    c.model = model_fields("gpt2-124m", vocab_size=VOCAB, dtype="bfloat16")
    c.data.tokenizer.vocab_size = VOCAB
    c.train.steps = 19_073  # 10B tokens at 524,288 tokens per step
    c.train.batch_size = 512
    c.train.microbatches = 16
    c.train.seq_len = 1024
    c.train.log_every = 10
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 700
    c.optimizer.schedule = "cosine"
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.eval.every_steps = 250
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 1000
    return c
