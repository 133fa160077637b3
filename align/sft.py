"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

Examples are packed several to a row, with segment ids so that none attends to another; the
batch's `loss_mask` selects the response tokens and the EOS that ends each response.
"""

from __future__ import annotations

import model
from align import trees
from train.step import LossOutput, token_losses


def loss_fn(cfg, model_config: model.ModelConfig):
    """Per-token NLL of the responses; the weight is the number of response tokens."""

    def fn(params, frozen, batch, rng):
        del rng
        policy = trees.policy(cfg, params, frozen)
        _, nll_sum, count = token_losses(model_config, policy, batch, chunk=cfg.train.loss_chunk)
        return LossOutput(nll_sum, count, {"loss": nll_sum})

    return fn
