"""The post-training config schema: pretraining's sections plus the method, where the run
starts, its data, LoRA and each method's settings; and their validation.

The model is not configured here: it is the one the run starts from (`init`), and the
resolved model fields are written to the run's `config.json`.
"""

from __future__ import annotations

import ml_collections

from align import data as align_data
from align import losses, rl, trees
from train import config as train_config


def base_config() -> ml_collections.ConfigDict:
    c = train_config.base_config()
    del c.sample  # post-training evaluates with `task` instead
    c.method = "sft"  # one of align.trees.METHODS
    c.init = ml_collections.ConfigDict(
        dict(
            from_workdir="",  # a pretraining or post-training workdir: its newest checkpoint
            from_hf="",  # or a Hugging Face model directory (config.json + safetensors)
            tokenizer="",  # with from_hf: its SentencePiece model (default: tokenizer.model there)
        )
    )
    c.data = align_data.default_config()
    c.data.max_prompt_len = 32
    c.lora = ml_collections.ConfigDict(
        dict(rank=0, alpha=16.0, targets=r"(attn/(q|k|v|o)|mlp/(up|gate|down))$")  # rank 0: off
    )
    c.dpo = ml_collections.ConfigDict(
        dict(
            beta=0.1,
            loss_type="sigmoid",  # align.losses.DPO_LOSS_TYPES
            label_smoothing=0.0,
            # 'online': run the frozen reference in every step; 'cached': compute its log-probs
            # once over the dataset before training; 'none': reference-free (log-probs 0).
            reference="cached",
            sft_weight=0.0,  # weight of the chosen responses' per-token NLL added to the loss
        )
    )
    c.kto = ml_collections.ConfigDict(dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
    c.reward = ml_collections.ConfigDict(dict(margin=0.0, center_coeff=0.0))
    # PPO and GRPO (align/online.py): prompts from the task, rewards from its checker or a
    # reward model.
    c.rl = ml_collections.ConfigDict(dict(
        train_problems=2000,  # prompts drawn from the task's training split
        reward_model="",  # a reward model's workdir (method 'reward'): it scores the responses; '': the checker
        value_init="zeros",  # PPO's value head: 'zeros' | 'reward_model' (its head, normalized)
        samples_per_prompt=4,  # G: responses per prompt (GRPO's group); train.batch_size counts prompts
        temperature=1.0,  # sampling temperature; every log-prob is of logits / temperature
        epochs=1,  # passes over each rollout
        minibatches=1,  # optimizer updates per pass
        clip_eps=0.2,
        kl_coef=0.05,  # PPO: the initial coefficient of the KL penalty; GRPO: of the k3 loss term
        kl_estimator="k1",  # PPO's per-token KL in the reward: k1 | k2 | k3 (align/rl.py)
        kl_target=0.0,  # PPO: > 0 turns on the adaptive controller (Ziegler et al.) toward it
        kl_horizon=10_000,
        gamma=1.0,
        lam=0.95,
        vf_coef=0.1,
        clip_eps_value=0.2,
        whiten_rewards=False,
        missing_eos_penalty=0.0,  # PPO: subtracted from the score of responses without EOS
        grpo_scale="std",  # "std" (GRPO) | "none" (Dr. GRPO)
        grpo_aggregation="token",  # "token" | "sequence" | "dr_grpo"
    ))
    # Held-out accuracy of the policy on a task with an exact checker (align/tasks/), measured
    # by greedy decoding at every evaluation; '' for none.
    c.task = ml_collections.ConfigDict(
        dict(name="", problems=200, seed=1, max_new_tokens=8, min_digits=1, max_digits=3)
    )
    c.train.batch_size = 16
    c.train.seq_len = 64
    c.train.steps = 200
    c.train.log_every = 5
    c.optimizer.update(lr=1e-4, warmup_steps=10, weight_decay=0.0, min_lr_ratio=0.0)
    c.eval.every_steps = 50
    c.eval.batch_size = 16
    c.checkpoint.every_steps = 50
    return c


# The rl keys of PPO's reward shaping, value head and KL controller; GRPO refuses a change to them.
_PPO_ONLY = (
    "value_init", "kl_target", "kl_horizon", "gamma", "lam", "vf_coef", "clip_eps_value", "whiten_rewards",
    "missing_eos_penalty",
)


def method_config(method: str, **sections) -> ml_collections.ConfigDict:
    """The base config for `method`, with `section=dict(key=value)` changes."""
    c = base_config()
    c.method = method
    for section, values in sections.items():
        c[section].update(values)
    return c


def validate(cfg, n_devices: int, n_processes: int) -> None:
    """Refuse inconsistent settings before any work; errors name the key."""

    def require(ok: bool, key: str, value, message: str):
        if not ok:
            raise ValueError(f"config.{key}={value!r}: {message}")

    require(cfg.method in trees.METHODS, "method", cfg.method, f"expected one of {trees.METHODS}")
    sources = [bool(cfg.init.from_workdir), bool(cfg.init.from_hf)]
    require(
        sum(sources) == 1, "init", cfg.init.to_dict(),
        "set exactly one of init.from_workdir and init.from_hf",
    )
    require(cfg.lora.rank >= 0, "lora.rank", cfg.lora.rank, "must be >= 0 (0: no LoRA)")
    require(
        cfg.dpo.loss_type in losses.DPO_LOSS_TYPES, "dpo.loss_type", cfg.dpo.loss_type,
        f"expected one of {losses.DPO_LOSS_TYPES}",
    )
    require(
        cfg.dpo.reference in ("online", "cached", "none"), "dpo.reference", cfg.dpo.reference,
        "expected 'online', 'cached' or 'none'",
    )
    require(cfg.dpo.beta > 0, "dpo.beta", cfg.dpo.beta, "must be positive (ipo divides by it)")
    require(
        0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing", cfg.dpo.label_smoothing,
        "must be in [0, 0.5): at 0.5 the labels carry no information",
    )
    require(cfg.kto.beta > 0, "kto.beta", cfg.kto.beta, "must be positive")
    require(
        cfg.data.max_prompt_len < cfg.train.seq_len, "data.max_prompt_len", cfg.data.max_prompt_len,
        f"must be below train.seq_len={cfg.train.seq_len}, to leave room for the response",
    )
    require(cfg.task.name in ("", "arithmetic"), "task.name", cfg.task.name, "expected '' or 'arithmetic'")
    if cfg.task.name:
        require(cfg.task.max_new_tokens >= 1, "task.max_new_tokens", cfg.task.max_new_tokens, "must be at least 1")
        require(
            cfg.data.max_prompt_len + cfg.task.max_new_tokens <= cfg.model.max_seq_len, "task.max_new_tokens",
            cfg.task.max_new_tokens,
            f"with data.max_prompt_len={cfg.data.max_prompt_len}, exceeds the model's max_seq_len={cfg.model.max_seq_len}",
        )
    if cfg.method in ("ppo", "grpo"):
        r = cfg.rl
        require(cfg.task.name != "", "task.name", cfg.task.name, f"{cfg.method} takes its prompts and rewards from a task")
        require(r.temperature > 0, "rl.temperature", r.temperature, "must be positive (the rollouts sample)")
        require(r.epochs >= 1, "rl.epochs", r.epochs, "must be at least 1")
        require(r.value_init in ("zeros", "reward_model"), "rl.value_init", r.value_init, "expected 'zeros' or 'reward_model'")
        require(
            r.value_init == "zeros" or r.reward_model, "rl.value_init", r.value_init,
            "needs rl.reward_model, the run whose head it starts from",
        )
        require(r.samples_per_prompt >= 1, "rl.samples_per_prompt", r.samples_per_prompt, "must be at least 1")
        require(r.clip_eps > 0, "rl.clip_eps", r.clip_eps, "must be positive")
        rows = cfg.train.batch_size * r.samples_per_prompt
        require(
            r.minibatches >= 1 and rows % r.minibatches == 0, "rl.minibatches", r.minibatches,
            f"must divide the rollout's {rows} rows (train.batch_size x rl.samples_per_prompt)",
        )
        require(
            (rows // r.minibatches) % n_devices == 0, "rl.minibatches", r.minibatches,
            f"a minibatch of {rows // r.minibatches} rows does not split over {n_devices} devices",
        )
        require(r.kl_horizon > 0, "rl.kl_horizon", r.kl_horizon, "must be positive (the adaptive KL controller divides by it)")
        require(r.kl_target >= 0, "rl.kl_target", r.kl_target, "must be >= 0 (0: a fixed coefficient)")
        require(
            r.missing_eos_penalty >= 0, "rl.missing_eos_penalty", r.missing_eos_penalty,
            "must be >= 0 (it is subtracted from the score)",
        )
        if cfg.method == "grpo":
            defaults = base_config().rl
            for key in _PPO_ONLY:
                require(r[key] == defaults[key], f"rl.{key}", r[key], "a PPO setting, which GRPO does not use")
        require(r.kl_estimator in rl.KL_ESTIMATORS, "rl.kl_estimator", r.kl_estimator, f"expected one of {rl.KL_ESTIMATORS}")
        require(r.grpo_scale in rl.GRPO_SCALES, "rl.grpo_scale", r.grpo_scale, f"expected one of {rl.GRPO_SCALES}")
        require(
            r.grpo_aggregation in rl.GRPO_AGGREGATIONS, "rl.grpo_aggregation", r.grpo_aggregation,
            f"expected one of {rl.GRPO_AGGREGATIONS}",
        )
        require(
            cfg.method == "ppo" or r.samples_per_prompt >= 2, "rl.samples_per_prompt", r.samples_per_prompt,
            "GRPO compares samples of one prompt: at least 2",
        )
    train_config.validate(cfg, n_devices, n_processes)
