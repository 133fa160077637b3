"""Log-probabilities of given next tokens, from the final hidden states, a chunk of positions
at a time, so that the float32 [B, T, V] logits never exist at once.

The loss of every method reads the targets' log-probabilities and, for the z-loss, the log
normalizer; neither needs the whole logits tensor. With `chunk` positions per piece, the
output head and log-softmax run on [B, chunk, V] logits inside a `lax.map` whose body is
rematerialized: the backward pass recomputes each piece's logits instead of keeping them, for
one extra head matmul. `chunk=0` takes the whole sequence at once (no remat): fastest when
the logits are small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.transformer import head_weights, output_logits


def _target_logprobs(config: ModelConfig, head, hidden_BTD, targets_BT, temperature):
    logits_BTV = output_logits(config, head, hidden_BTD)
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_BT - log_z_BT, log_z_BT


def target_logprobs(
    config: ModelConfig, params, hidden_BTD, targets_BT, *, chunk: int = 0, temperature: float = 1.0
):
    """(log p(target) [B, T], log Z [B, T]), float32, of logits / `temperature`."""
    head = head_weights(config, params)
    B, T, D = hidden_BTD.shape
    if not chunk or chunk >= T:
        return _target_logprobs(config, head, hidden_BTD, targets_BT, temperature)
    pieces = -(-T // chunk)
    padding = pieces * chunk - T  # padded positions are computed and dropped
    hidden_PBCD = jnp.pad(hidden_BTD, ((0, 0), (0, padding), (0, 0))).reshape(B, pieces, chunk, D).swapaxes(0, 1)
    targets_PBC = jnp.pad(targets_BT, ((0, 0), (0, padding))).reshape(B, pieces, chunk).swapaxes(0, 1)
    piece = jax.checkpoint(lambda h, y: _target_logprobs(config, head, h, y, temperature))
    logp_PBC, log_z_PBC = jax.lax.map(lambda xs: piece(*xs), (hidden_PBCD, targets_PBC))
    unchunk = lambda x_PBC: x_PBC.swapaxes(0, 1).reshape(B, pieces * chunk)[:, :T]
    return unchunk(logp_PBC), unchunk(log_z_PBC)
