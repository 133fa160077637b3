"""Template for a multi-host run (TPU VM pod, e.g. v5p-64, or multi-node GPU).

The corpus is prepared once, before training, into a `data.cache_dir` every host sees: on a
cluster (`--config.data.executor=ray` or `slurm`), or split over the pod's hosts, host i of n
running `python -m data.prepare --config=experiments/tpu_pod.py --host_index=i --host_count=n`.
Then every host runs the same command; `jax.distributed.initialize()` joins them, each host
reads its own slice of the data (by process index) and checkpoints are written
collectively. Put the workdir on storage every host sees (e.g. gs://bucket/run):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
    "cd lmx && .venv/bin/python -m train.pretrain --config=experiments/tpu_pod.py --workdir=gs://bucket/run"
"""

from train.config import base_config, model_fields

VOCAB = 32768


def get_config():
    c = base_config()
    c.model = model_fields("llama-1b", vocab_size=VOCAB, dtype="bfloat16", remat="dots")
    c.data.tokenizer.vocab_size = VOCAB
    # 64 chips: FSDP over 16 per data replica, 4 replicas; no tensor parallelism at 1B.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, -1, 1
    c.train.steps = 50_000
    c.train.batch_size = 512
    c.train.seq_len = 4096
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.schedule = "wsd"
    c.optimizer.decay_fraction = 0.2
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 1000
    c.eval.batch_size = 512
    return c
