"""Log-probabilities of response tokens under a policy: the one function every method uses.

Batches may stack several sequences per example ([B, 2, T] for preference pairs): leading
axes are flattened into one forward pass (chosen and rejected go through the model together)
and restored afterwards.
"""

from __future__ import annotations

import jax.numpy as jnp

import model
from align import losses
from model.logprobs import target_logprobs


def response_logps(config: model.ModelConfig, params, batch, chunk: int = 0):
    """(log-probs, token counts), each [...]: the targets' log-probs summed over `loss_mask`,
    from float32 log-softmax; prompt and padding tokens contribute nothing. The head runs on
    `chunk` positions at a time (`model.logprobs`; 0: all at once)."""
    lead = batch["inputs"].shape[:-1]
    flat = lambda key: batch[key].reshape(-1, batch[key].shape[-1])
    hidden_BTD = model.hidden_states(
        config, params, flat("inputs"), segment_ids=flat("segment_ids"), positions=flat("positions")
    )
    token_logps_BT, _ = target_logprobs(config, params, hidden_BTD, flat("targets"), chunk=chunk)
    mask_BT = flat("loss_mask").astype(jnp.float32)
    logps_B = losses.sequence_logps(token_logps_BT, mask_BT)
    return logps_B.reshape(lead), jnp.sum(mask_BT, axis=-1).reshape(lead)
