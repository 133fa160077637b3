"""A tiny experiment for end-to-end trainer tests, importable by a trainer subprocess."""

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
