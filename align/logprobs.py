"""Log-probabilities of response tokens under a policy: the one function every method uses.

Batches may stack several sequences per example ([B, 2, T] for preference pairs): leading
axes are flattened into one forward pass (chosen and rejected go through the model together)
and restored afterwards.
"""

from __future__ import annotations

import jax.numpy as jnp

import model
from align import losses


def response_logps(config: model.ModelConfig, params, batch):
    """(log-probs, token counts), each [...]: the targets' log-probs summed over `loss_mask`,
    from float32 log-softmax; prompt and padding tokens contribute nothing."""
    lead = batch["inputs"].shape[:-1]
    flat = lambda key: batch[key].reshape(-1, batch[key].shape[-1])
    logits_BTV = model.forward(
        config, params, flat("inputs"), segment_ids=flat("segment_ids"), positions=flat("positions")
    )
    mask_BT = flat("loss_mask").astype(jnp.float32)
    token_logps_BT = losses.token_logps(logits_BTV, flat("targets"))
    logps_B = losses.sequence_logps(token_logps_BT, mask_BT)
    return logps_B.reshape(lead), jnp.sum(mask_BT, axis=-1).reshape(lead)
