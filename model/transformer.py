"""Decoder-only Transformer as Flax Linen modules, and the pure functions around them.

Dimension letters used in names:
  B batch, T query length, S key length (cache), D d_model, N query heads,
  K key/value heads, H head_dim, F d_ff, V vocab, L layers, M rows of a 2-D matmul (B * T).
V is the stored vocabulary, `config.padded_vocab_size`: ids from `config.vocab_size` on are
padding, with zero embedding rows and masked logits (`output_logits`).

Parameters are a plain pytree (`init_params`); `forward(config, params, tokens)` is the one
forward function. Every parameter carries logical axis names and large activations are
constrained by them (`model/sharding.py` maps names onto the mesh).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint
from model.attention import attend, run_starts
from model.config import ModelConfig
from model.sharding import constrain, param_shardings

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, shape, axes, init):
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _bias(module: nn.Module, name: str, shape, axes):
    """A zero-initialized bias in the compute dtype; None for a model without biases."""
    if not module.config.use_bias:
        return None
    return _param(module, name, shape, axes, nn.initializers.zeros).astype(module.config.compute_dtype)


def _transposed(init):
    """`init` drawn for the transposed shape: the [V, D] head gets the values a [D, V]
    kernel drawn from the same key would, so a seed gives the same model in either layout."""
    return lambda key, shape, dtype: init(key, shape[::-1], dtype).T


def _zero_padding(init, vocab_size: int):
    """`init` with the rows of padded ids zero, as `from_hf` makes them. Their softmax
    probability is exactly 0 (`output_logits`), so the losses send them no gradient and they
    stay zero."""
    return lambda key, shape, dtype: init(key, shape, dtype).at[vocab_size:].set(0)


def _dense_init(config: ModelConfig, residual: bool = False):
    # GPT-2: projections into the residual stream are scaled down by sqrt(2 L).
    std = config.init_std / (math.sqrt(2 * config.n_layers) if residual else 1.0)
    return nn.initializers.normal(std)


class Norm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        x = x_BTD.astype(jnp.float32)
        if c.norm == "rmsnorm":
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps)
        else:
            centered = x - jnp.mean(x, axis=-1, keepdims=True)
            y = centered * jax.lax.rsqrt(jnp.mean(centered**2, axis=-1, keepdims=True) + c.norm_eps)
        y = y * _param(self, "scale", (c.d_model,), ("norm",), nn.initializers.ones)
        if c.norm == "layernorm" and c.use_bias:
            y = y + _param(self, "bias", (c.d_model,), ("norm",), nn.initializers.zeros)
        return y.astype(c.compute_dtype)


def project(x_BTI, w_IO, bias_O=None):
    """Every token's [*I] vector times `w` [*I, *O], plus `bias` [*O] if given: [B, T, *I] ->
    [B, T, *O], as one 2-D matmul over the B*T tokens. The same product as an einsum, but
    XLA:CPU computes the 2-D form's weight gradient 3x faster: 11 against 34 ms (jitted
    `jax.vjp`, float32, 16 x 128 tokens, a 384 x 1,536 weight), where the einsum's gradient
    first transposes the output gradient."""
    B, T, *I = x_BTI.shape
    O = w_IO.shape[len(I) :]
    x_MI, w_IO = x_BTI.reshape(B * T, math.prod(I)), w_IO.reshape(math.prod(I), math.prod(O))
    bias_O = None if bias_O is None else bias_O.reshape(-1)
    y_MO = (_narrow_matmul if _narrow_on_cpu(x_MI.dtype) else _matmul)(x_MI, w_IO, bias_O)
    return y_MO.reshape(B, T, *O)


def _matmul(x_MI, w_IO, bias_O):
    y_MO = jnp.dot(x_MI, w_IO)
    return y_MO if bias_O is None else y_MO + bias_O


@jax.custom_vjp
def _narrow_matmul(x_MI, w_IO, bias_O):
    """`_matmul` of 16-bit operands on the CPU, where XLA runs a 16-bit matmul as one in
    float32 (both operands converted) unless it accumulates into float32 and reads both
    operands row-major: then it is YNNPACK's 16-bit kernel (bfloat16, 2,048 x 384 x 1,536 on
    the Intel machine with AMX of the README: 1.4 ms, against 8.9 ms converted to float32).
    So every product here, forward and backward, is of row-major operands into float32, the
    transposed ones copied first (the weight gradient: 2.1 against 11.4 ms)."""
    y_MO = jnp.dot(x_MI, w_IO, preferred_element_type=jnp.float32)
    if bias_O is not None:
        y_MO += bias_O.astype(jnp.float32)
    return y_MO.astype(x_MI.dtype)


def _narrow_matmul_fwd(x_MI, w_IO, bias_O):
    return _narrow_matmul(x_MI, w_IO, bias_O), (x_MI, w_IO, bias_O)


def _narrow_matmul_bwd(residuals, g_MO):
    x_MI, w_IO, bias_O = residuals
    g_MO = g_MO.astype(x_MI.dtype)
    dx_MI = jnp.dot(g_MO, _row_major_transpose(w_IO), preferred_element_type=jnp.float32)
    dw_IO = jnp.dot(_row_major_transpose(x_MI), g_MO, preferred_element_type=jnp.float32)
    dbias_O = None if bias_O is None else jnp.sum(g_MO.astype(jnp.float32), axis=0).astype(bias_O.dtype)
    return dx_MI.astype(x_MI.dtype), dw_IO.astype(w_IO.dtype), dbias_O


_narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


def _narrow_on_cpu(dtype) -> bool:
    """Whether matmuls of `dtype` operands run on the CPU, where XLA's fast kernel for them
    takes row-major operands only (`_narrow_matmul`)."""
    return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def _row_major_transpose(a):
    """a.T stored transposed: left alone, XLA makes a transpose a change of layout."""
    return with_layout_constraint(a.T, Layout(major_to_minor=(0, 1)))


def apply_rope(x_BTNH, positions_BT, theta: float):
    """Rotary embedding in the rotate-half layout used by Llama checkpoints."""
    half = x_BTNH.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles_BTh)[:, :, None, :], jnp.sin(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTNH.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, attention_inputs, kv_cache, layer, cache_index):
        c = self.config
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        dt = c.compute_dtype
        init = _dense_init(c)
        w_q = _param(self, "q", (D, N, H), ("embed", "heads", "head_dim"), init)
        w_k = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
        w_v = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
        w_o = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed"), _dense_init(c, True))
        q_BTNH = project(x_BTD, w_q.astype(dt), _bias(self, "q_bias", (N, H), ("heads", "head_dim")))
        k_BTKH = project(x_BTD, w_k.astype(dt), _bias(self, "k_bias", (K, H), ("kv_heads", "head_dim")))
        v_BTKH = project(x_BTD, w_v.astype(dt), _bias(self, "v_bias", (K, H), ("kv_heads", "head_dim")))
        if c.positions == "rope":
            q_BTNH = apply_rope(q_BTNH, positions_BT, c.rope_theta)
            k_BTKH = apply_rope(k_BTKH, positions_BT, c.rope_theta)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "length", "kv_heads", "head_dim"))

        if kv_cache is None:  # attention_inputs: segment ids [B, T] or None
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, attention_inputs, implementation=c.attention)
        else:  # attention_inputs: the mask [B, T, S] over the cache's slots
            kv_cache, k_BKSH, v_BKSH = _write_cache(kv_cache, layer, cache_index, k_BTKH, v_BTKH)
            out_BTNH = _cached_attention(q_BTNH, k_BKSH.astype(dt), v_BKSH.astype(dt), attention_inputs)
        out_BTD = project(out_BTNH, w_o.astype(dt), _bias(self, "o_bias", (D,), ("embed",)))
        return out_BTD, kv_cache


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        D, F = c.d_model, c.d_ff
        dt = c.compute_dtype
        w_up = _param(self, "up", (D, F), ("embed", "mlp"), _dense_init(c))
        w_down = _param(self, "down", (F, D), ("mlp", "embed"), _dense_init(c, True))
        h_BTF = project(x_BTD, w_up.astype(dt), _bias(self, "up_bias", (F,), ("mlp",)))
        # The activation in float32, rounded once: in 16 bits XLA rounds after each of its
        # elementwise ops, and XLA:CPU converts around every one (GELU and its gradient over
        # [2,048, 1,536] in bfloat16: 8.5 ms, against 2.4 ms so).
        if c.mlp == "swiglu":
            w_gate = _param(self, "gate", (D, F), ("embed", "mlp"), _dense_init(c))
            gate_BTF = project(x_BTD, w_gate.astype(dt))
            h_BTF = (jax.nn.silu(gate_BTF.astype(jnp.float32)) * h_BTF.astype(jnp.float32)).astype(dt)
        else:
            h_BTF = jax.nn.gelu(h_BTF.astype(jnp.float32), approximate=True).astype(dt)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return project(h_BTF, w_down.astype(dt), _bias(self, "down_bias", (D,), ("embed",)))


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, positions_BT, attention_inputs, layer, cache_index):
        """`carry` is (x_BTD, the KV cache of every layer or None); `layer` this block's index."""
        c = self.config
        x_BTD, kv_cache = carry
        h_BTD, kv_cache = Attention(c, name="attn")(
            Norm(c, name="attn_norm")(x_BTD), positions_BT, attention_inputs, kv_cache, layer, cache_index
        )
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(x_BTD))
        return (constrain(x_BTD, ("batch", "length", "embed")), kv_cache), None


def _scan_unroll(config: ModelConfig) -> int:
    """Layers per iteration of the scanned stack. XLA:CPU and XLA:GPU run the whole stack
    unrolled: in a rolled loop every activation the backward pass reads is written to a
    stacked buffer, where unrolled it fuses the cheap ones into their consumers. On the CPU,
    `jax.grad` of the summed cross-entropy of 16 x 128 tokens through `experiments.peers`'
    model (6 layers of width 384, float32) takes 0.92-0.97 s unrolled against 1.20-1.24 s
    rolled. On one H200 the GPT-2 124M step (bfloat16, 32 x 1024, pallas_gpu) took 94.9 ms
    without the layer loop against 108.6 ms with it (23.9 against 34.6 GiB of temporaries);
    the rolled step's profile (115.7 ms of kernels) has 15.0 ms zero-filling and updating
    [layers, B, T, ...] buffers and 9.6 ms of device copies. The unrolled loop compiles to the
    same step as no loop: 46.4 GiB of temporaries for that step compiled for the CPU either
    way, 59.2 GiB rolled. TPUs keep the loop, which compiles one layer instead of all of
    them, and so does remat, which the unrolled stack undoes: with `remat="full"` that step's
    temporaries are 14.3 GiB rolled and 46.4 GiB unrolled, as without remat."""
    if jax.default_backend() == "tpu" or config.remat != "none":
        return 1
    return config.n_layers


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, attention_inputs, kv_cache=None, cache_index=None, with_head=True):
        """`attention_inputs`: without a cache, the segment ids [B, T] (None: one causal
        sequence per row); with one, the mask [B, T, S] over its slots."""
        c = self.config
        D, V = c.d_model, c.padded_vocab_size
        init = _zero_padding(_dense_init(c), c.vocab_size)
        embedding = _param(self, "embedding", (V, D), ("vocab", "embed"), init)
        x_BTD = jnp.take(constrain(embedding, ("vocab", None)), tokens_BT, axis=0).astype(c.compute_dtype)
        if c.positions == "learned":
            table = _param(self, "position_embedding", (c.max_seq_len, D), ("max_len", "embed"), _dense_init(c))
            x_BTD = x_BTD + jnp.take(constrain(table, ("max_len", None)), positions_BT, axis=0).astype(c.compute_dtype)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        carry = (x_BTD, kv_cache)
        if c.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=c.n_layers,
                unroll=_scan_unroll(c),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="layers")
            carry, _ = layers(carry, positions_BT, attention_inputs, jnp.arange(c.n_layers), cache_index)
        else:
            for i in range(c.n_layers):
                carry, _ = block(c, name=f"layer_{i}")(carry, positions_BT, attention_inputs, i, cache_index)
        x_BTD, kv_cache = carry

        x_BTD = Norm(c, name="final_norm")(x_BTD)
        if c.tie_embeddings:
            head = embedding
        else:
            init = _zero_padding(_transposed(_dense_init(c)), c.vocab_size)
            head = _param(self, "head", (V, D), ("vocab", "embed"), init)
        if not with_head:
            return x_BTD, kv_cache
        return output_logits(c, head, x_BTD), kv_cache


# The logit of a padded id. Its softmax probability is exactly 0 in float32, and unlike -inf
# it keeps p * log p, differences of log-probs and logits / temperature finite.
PADDING_LOGIT = -1e9


def output_logits(config: ModelConfig, head, x_BTD):
    """Logits [B, T, V] in float32 from final hidden states; `head` is [V, D], the embedding
    when tied (the layout of Hugging Face's lm_head; on CPU its gradient with autodiff's
    cross-entropy took 2.7 s against 3.0 s for [D, V] at B=16, T=128, D=768, V=50,304).

    V is the padded vocabulary: the logits of ids from `config.vocab_size` on are
    `PADDING_LOGIT` (plus their rows' own logits, zero while the rows are), so no softmax,
    argmax or sampler downstream picks them. This is the one place logits are made;
    `logits[..., :config.vocab_size]` are Hugging Face's logits."""
    return mask_padding(config, unmasked_logits(config, head, x_BTD))


def unmasked_logits(config: ModelConfig, head, x_BTD):
    """`output_logits` before `mask_padding`."""
    B, T, D = x_BTD.shape
    # One 2-D matmul over the tokens, as in `project`: on CPU the gradients of 16 x 128 tokens
    # through an [8,192, 384] head take 116 ms, against 155 ms as the einsum "BTD,VD->BTV".
    matmul = _head_matmul if config.compute_dtype == jnp.float32 else _head_matmul_narrow_gradient
    logits_BTV = matmul(x_BTD.reshape(B * T, D), head.astype(config.compute_dtype)).reshape(B, T, -1)
    return constrain(logits_BTV, ("batch", "length", "vocab"))


def mask_padding(config: ModelConfig, logits_BTV):
    """Logits with those of the padded ids set to `PADDING_LOGIT` plus their own value.
    Added, not selected: the gradient passes through as it is. The compiled GPT-2 124M step
    (B=4, T=128, CPU) holds 1.39 GiB of temporaries in float32 and 1.53 GiB in bfloat16
    compute, as much as with the vocabulary unpadded."""
    if config.padded_vocab_size == config.vocab_size:
        return logits_BTV
    real_V = jnp.arange(config.padded_vocab_size) < config.vocab_size
    return logits_BTV + jnp.where(real_V, 0.0, PADDING_LOGIT)


def _head_matmul(x_MD, head_VD):
    """Float32 logits [M, V] = x [M, D] head[V, D]^T."""
    return jax.lax.dot_general(x_MD, head_VD, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _head_matmul_narrow_gradient(x_MD, head_VD):
    """`_head_matmul` of operands narrower than float32, whose backward pass casts the logits'
    float32 gradient to their dtype before its two matmuls, as mixed precision does for every
    other layer; it serves gradients taken through `forward` (the training losses go through
    `model.logprobs`, whose backward pass does the same cast). Left to autodiff, a float32
    gradient times a bfloat16 operand is a float32 matmul: on an H200 the GPT-2 124M step
    (bf16, 32 x 1024), before it had either, spent 15.0 of its 115.7 ms of kernels in these
    two, run as TF32, against 3.5 ms for the forward one in bfloat16 (profile of 3 steps). On
    the CPU the GPT-2 head and cross-entropy gradient of 16 x 128 tokens in bfloat16 takes
    1.46 s this way against 1.76 s with autodiff's float32 matmuls (median of 7, on the AMX
    machine of `_narrow_matmul`; on an AMD EPYC without AMX 5.5 against 4.6 s, before the
    head's gradient was a row-major product); float32 compute keeps autodiff's."""
    return _head_matmul(x_MD, head_VD)


def _head_matmul_fwd(x_MD, head_VD):
    return _head_matmul(x_MD, head_VD), (x_MD, head_VD)


def _head_matmul_bwd(residuals, g_MV):
    return head_matmul_gradients(*residuals, g_MV)


def head_matmul_gradients(x_MD, head_VD, g_MV):
    """(d x, d head) of `_head_matmul` for the logits' gradient `g_MV`, cast to the operands'
    dtype first, so that both matmuls run in it (float32 accumulation)."""
    g_MV = g_MV.astype(x_MD.dtype)
    dx_MD = jnp.dot(g_MV, head_VD, preferred_element_type=jnp.float32)
    if _narrow_on_cpu(x_MD.dtype):  # GPT-2's head, 2,048 tokens: 269 against 720 ms
        dhead_VD = jnp.dot(_row_major_transpose(g_MV), x_MD, preferred_element_type=jnp.float32)
    else:
        dhead_VD = jax.lax.dot_general(g_MV, x_MD, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx_MD.astype(x_MD.dtype), dhead_VD.astype(head_VD.dtype)


_head_matmul_narrow_gradient.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def head_weights(config: ModelConfig, params):
    """The output projection `output_logits` takes: the embedding when tied."""
    return params["embedding"] if config.tie_embeddings else params["head"]


def positions_from_segments(segment_ids_BT):
    """Position of every token within its segment (0 at each segment's first token)."""
    T = segment_ids_BT.shape[1]
    index_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
    segment_start_BT = jax.lax.cummax(jnp.where(run_starts(segment_ids_BT), index_BT, 0), axis=1)
    return index_BT - segment_start_BT


def _attention_mask(query_segments_BT, key_segments_BS, query_slots_T):
    """Causal by slot and within a segment: key j is visible to query i iff j <= slot(i)
    and both carry the same segment id."""
    key_slots_S = jnp.arange(key_segments_BS.shape[1])
    causal_TS = key_slots_S[None, :] <= query_slots_T[:, None]
    same_segment_BTS = query_segments_BT[:, :, None] == key_segments_BS[:, None, :]
    return causal_TS[None] & same_segment_BTS


def _positions(tokens_BT, segment_ids, positions):
    if positions is not None:
        return positions
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)


def forward(config: ModelConfig, params, tokens_BT, *, segment_ids=None, positions=None):
    """Logits [B, T, V] in float32. With `segment_ids` (packed sequences; 0 marks padding)
    no token attends across segments, and positions restart in each segment."""
    positions = _positions(tokens_BT, segment_ids, positions)
    logits, _ = Transformer(config).apply({"params": params}, tokens_BT, positions, segment_ids)
    return logits


def hidden_states(config: ModelConfig, params, tokens_BT, *, segment_ids=None, positions=None):
    """Final normalized hidden states [B, T, D] in the compute dtype: what the output head,
    and the scalar heads of reward and value models, read. `output_logits(config,
    head_weights(config, params), hidden)` equals `forward`."""
    positions = _positions(tokens_BT, segment_ids, positions)
    hidden, _ = Transformer(config).apply(
        {"params": params}, tokens_BT, positions, segment_ids, with_head=False
    )
    return hidden


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None):
    """An empty KV cache for `max_len` positions; slots with segment id 0 are empty. Keys and
    values are laid out [B, K, S, H] per layer, the operand layout of the attention matmuls:
    one [L, B, K, S, H] array each for a scanned stack, a tuple of L arrays for unrolled layers
    (what decoding uses: each layer then writes and reads its own buffer, no slice of a stack).
    From batch 8 up no decoding step copies the cache; at batch 1 XLA:CPU makes the values'
    product a matrix-vector one and copies each layer's values transposed every step (4.8 of
    30 ms per token, GPT-2 124M with 320 slots; storing them transposed moved the copies into
    the decode loop's carry instead)."""
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if config.scan_layers:
        empty = lambda: jnp.zeros((config.n_layers, *shape), dtype)
    else:
        empty = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return {
        "k": empty(),
        "v": empty(),
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _write_cache(kv_cache, layer, index, k_BTKH, v_BTKH):
    """Write T new keys and values at slot `index` of `layer`'s cache, in place (the buffers
    are updated with dynamic_update_slice, never copied); returns (cache, the layer's keys
    [B, K, S, H], its values)."""

    def write(buffer, new_BTKH):
        new_BKTH = new_BTKH.transpose(0, 2, 1, 3)
        if isinstance(buffer, tuple):  # unrolled layers: `layer` is a Python int
            layer_BKSH = jax.lax.dynamic_update_slice(buffer[layer], new_BKTH.astype(buffer[layer].dtype), (0, 0, index, 0))
            return buffer[:layer] + (layer_BKSH,) + buffer[layer + 1:], layer_BKSH
        # a scanned stack: `layer` is traced, the stack's leading axis
        stack = jax.lax.dynamic_update_slice(buffer, new_BKTH[None].astype(buffer.dtype), (layer, 0, 0, index, 0))
        return stack, stack[layer]

    k, k_BKSH = write(kv_cache["k"], k_BTKH)
    v, v_BKSH = write(kv_cache["v"], v_BTKH)
    return {"k": k, "v": v}, k_BKSH, v_BKSH


def _cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS):
    """Attention of T new queries over the cache's S slots; G = N // K query heads share a
    kv head. Scores and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS / jnp.sqrt(H).astype(jnp.float32), -1e30)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BKSH->BTKGH", probs_BKGTS, v_BKSH)
    return out_BTKGH.reshape(B, T, N, H)


def prefill(config: ModelConfig, params, tokens_BT, cache, *, segment_ids=None, positions=None):
    """Run T new tokens through the model, appending their keys/values to `cache`.

    Returns (logits [B, T, V], cache). Left-padded prompts: give padding segment id 0 and
    real tokens segment id 1, with positions counted from each row's first real token.
    """
    B, T = tokens_BT.shape
    index = cache["index"]
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(T), (B, T))
    key_segments_BS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
    mask_BTS = _attention_mask(segment_ids, key_segments_BS, index + jnp.arange(T))
    kv = {"k": cache["k"], "v": cache["v"]}
    logits, kv = Transformer(config).apply(
        {"params": params}, tokens_BT, positions, mask_BTS, kv, index
    )
    new_cache = {**kv, "segment_ids": key_segments_BS, "index": index + T}
    return logits, new_cache


def decode_step(config: ModelConfig, params, tokens_B, cache, *, positions=None, segment_ids=None):
    """One token per row: returns (logits [B, V], cache)."""
    logits, cache = prefill(
        config, params, tokens_B[:, None], cache,
        segment_ids=None if segment_ids is None else segment_ids[:, None],
        positions=None if positions is None else positions[:, None],
    )
    return logits[:, 0], cache


def layer_params(config: ModelConfig, params) -> list:
    """Each layer's parameter tree, from either layout (stacked under "layers" or "layer_i")."""
    if config.scan_layers:
        return [jax.tree.map(lambda a: a[i], params["layers"]) for i in range(config.n_layers)]
    return [params[f"layer_{i}"] for i in range(config.n_layers)]


def unrolled(config: ModelConfig, params):
    """(config, params) of the same model with its layers unrolled (`scan_layers=False`).
    Decoding uses it: in a scanned stack every layer's weights are sliced out of the stack
    anew for each token, a copy of the whole model per token."""
    if not config.scan_layers:
        return config, params
    layers = layer_params(config, params)
    params = {k: v for k, v in params.items() if k != "layers"}
    return config.replace(scan_layers=False), {**params, **{f"layer_{i}": layer for i, layer in enumerate(layers)}}


def _boxed_params(config: ModelConfig, rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens, tokens, None)["params"]


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the parameters, boxed with their logical axis names."""
    return jax.eval_shape(functools.partial(_boxed_params, config), jax.random.key(0))


def param_specs(config: ModelConfig):
    """Tree of PartitionSpecs of logical axis names, one per parameter."""
    return nn.get_partition_spec(abstract_params(config))


def init_params(config: ModelConfig, rng, mesh=None):
    """Initialize parameters; with `mesh`, each device creates only its own shards."""
    init = jax.jit(lambda key: nn.meta.unbox(_boxed_params(config, key)))
    if mesh is None:
        return init(rng)
    shardings = param_shardings(param_specs(config), mesh)
    return jax.jit(init, out_shardings=shardings)(rng)
