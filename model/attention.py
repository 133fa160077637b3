"""Causal self-attention over packed sequences, with one entry point and several kernels.

`attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, implementation=...)`: key j is visible to
query i iff j <= i and both carry the same segment id (segment_ids None: plain causal).
Segment id 0 marks padding; padding rows get finite outputs of no meaning. N is a multiple
of K (GQA; K=1 is MQA). Softmax in float32 with scale 1/sqrt(H); output in q's dtype.

Implementations (all equal "xla": to float32 rounding, cudnn_gpu at bfloat16's resolution;
tests/model/test_attention.py):
  xla         `jax.nn.dot_product_attention` with the dense [B, 1, T, T] mask; builds the
              float32 [B, N, T, T] scores.
  blockwise   pure JAX flash attention (any backend): query blocks, online softmax over key
              blocks, keys above the diagonal never visited, block pairs where no row
              shares a segment skipped at run time; custom VJP (flash backward), so memory
              is O(T * block) in the backward pass too; a sequence within one query tile
              is computed densely (`_one_tile`). On the CPU it is 10x faster than xla by
              T=2048 (CPU_BLOCKWISE_MIN_LEN).
  pallas_gpu  Triton flash kernel `jax.experimental.pallas.ops.gpu.attention.mha`.
  cudnn_gpu   cuDNN's fused flash attention (bfloat16 or float16, Hopper or later for packed
              rows): each row's documents go to cuDNN's packed layout as separate sequences
              (`segment_runs`), so the segment ids must be contiguous runs, as packing makes them.
  splash_tpu  TPU kernel `jax.experimental.pallas.ops.tpu.splash_attention`.
  auto        `resolve`: by backend, and on the CPU by sequence length.
Dimension letters as in model/transformer.py, plus G = N // K query heads per kv head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from model.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas_gpu", "cudnn_gpu", "splash_tpu")

# On the CPU "auto" takes blockwise from this sequence length on, xla below it: at T=64 and
# T=128 they were within a run's noise of each other, and blockwise held less (the figures
# below; since then a sequence within one tile takes `_one_tile`, faster still). Measured on
# the 2-core CPU: f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v,
# segment_ids, implementation=...) * w), (0, 1, 2))) on random float32 [B, T, 12, 64] inputs,
# equal-length segments, block_sizes=(128, 128); one warm-up call, then 5-11 timed calls with
# xla and blockwise interleaved; median (min) seconds and
# f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes:
#   B=32 T=64,   1 segment    xla 0.025 (0.021)   30 MiB   blockwise 0.021 (0.020)  24 MiB
#   B=16 T=128,  1 segment    xla 0.062 (0.051)   54 MiB   blockwise 0.053 (0.045)  36 MiB
#   B=16 T=128,  4 segments   xla 0.055 (0.052)   54 MiB   blockwise 0.053 (0.050)  36 MiB
#   B=2  T=2048, 4 segments   xla 2.56  (2.55)  1548 MiB   blockwise 0.254 (0.242)  84 MiB
#   B=2  T=2048, 1 segment                                 blockwise 0.558 (0.536)  84 MiB
CPU_BLOCKWISE_MIN_LEN = 128

# (query, key) tiles when `attend` is given none. Blockwise: fewer, larger matmuls pay on the
# CPU. value_and_grad as above on [2, 2048, 6, 64], one segment, median of 5 calls after a
# warm-up, milliseconds forward / forward+backward: (128, 128) 97 / 282, (256, 256) 89 / 252,
# (256, 512) 71 / 193, (512, 512) 75 / 204, (128, 512) 81 / 206, (256, 1024) 77 / 197; with
# 4 segments (each tile pair must hold a shared segment to be computed): (128, 128) 34 / 106,
# (256, 512) 35 / 92, (512, 512) 42 / 105. torch's causal scaled_dot_product_attention: 30 / 107.
# pallas_gpu, on one H200: the same value_and_grad on bfloat16 [32, 1024, 12, 64], one segment,
# median of 10 calls, forward / forward+backward ms, by forward tiles, backward tiles, warps
# and pipeline stages: 128x128, 32, default warps, 2 stages (the library's defaults) 0.59 / 2.43;
# 128x64, 32 0.57 / 2.44; 128x128, 64 0.55 / 1.72; 128x64, 64 0.59 / 1.71; 128x64, 64, 4 warps,
# 3 stages 0.53 / 1.67; 64x64, 64, 4, 3 0.52 / 1.59; 128x64, 64, 8, 3 0.52 / 2.84. cuDNN's
# causal kernel (no segment ids) 0.35 / 1.17; xla 2.70 / 6.59. The GPT-2 124M train step (bf16,
# 32 x 1024) took 117.6 ms with the library's defaults and 108.6 ms with 128x64, 64, 4, 3.
# splash_tpu keeps the tiles it was checked with.
BLOCK_SIZES = {"blockwise": (256, 512), "pallas_gpu": (128, 64), "splash_tpu": (128, 128)}
PALLAS_GPU_BACKWARD_BLOCK = 64
PALLAS_GPU_WARPS, PALLAS_GPU_STAGES = 4, 3

_MASKED = -1e30  # finite, so exp(_MASKED - m) is 0 or 1 and never NaN


def resolve(implementation: str, seq_len: int) -> str:
    """The implementation `attend` runs for `implementation` ("auto" picks by backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention: unknown implementation {implementation!r}; one of {IMPLEMENTATIONS}"
        )
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas_gpu"
    if backend == "tpu":
        return "splash_tpu"
    return "blockwise" if seq_len >= CPU_BLOCKWISE_MIN_LEN else "xla"


def attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, implementation: str,
           block_sizes: tuple[int, int] | None = None, interpret: bool | None = None):
    """Causal, segment-masked attention: out [B, T, N, H] in q's dtype.

    `block_sizes` are the (query, key) tiles of blockwise and the kernels (each rounds them
    to what it supports; None: the implementation's own, BLOCK_SIZES); `interpret` runs the
    Pallas kernels in the interpreter (by default, when the backend is not the kernel's: the
    CPU tests). Under a mesh the Pallas kernels run per shard (`shard_map` over the batch and
    head axes of the logical sharding rules), since XLA cannot partition a kernel call itself."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if N % K:
        raise ValueError(f"model.attention: {N} query heads are not a multiple of {K} kv heads")
    name = resolve(implementation, T)
    if name == "xla":
        return _xla(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if name == "cudnn_gpu":
        return _per_shard(_cudnn_gpu, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    block_q, block_k = block_sizes or BLOCK_SIZES[name]
    if name == "blockwise":
        return _blockwise(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_k)
    kernel, platform = {"pallas_gpu": (_pallas_gpu, "gpu"), "splash_tpu": (_splash_tpu, "tpu")}[name]
    if interpret is None:
        interpret = jax.default_backend() != platform
    run = lambda q, k, v, seg: kernel(q, k, v, seg, block_q, block_k, interpret)
    return _per_shard(run, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def _per_shard(run, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """`run` on each device's shard of the batch and heads (directly without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return run(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"))
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"))
    if segment_ids_BT is None:
        return jax.shard_map(
            lambda q, k, v: run(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
            check_vma=False,  # the kernels' outputs carry no varying-axes annotation
        )(q_BTNH, k_BTKH, v_BTKH)
    segment_spec = logical_to_spec(("batch", "length"))
    return jax.shard_map(
        run, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec, check_vma=False
    )(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def causal_segment_mask(segment_ids_BT, T: int):
    """[B, 1, T, T] boolean mask (or [1, 1, T, T] without segments) the reference uses."""
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids_BT is None:
        return causal_TS[None, None]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal_TS[None] & same_BTS)[:, None]


def _xla(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    if q_BTNH.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # dot_product_attention asks for float16 products summed in float32, which XLA's CPU
        # backend refuses ("precision F16_F16_F32 is not supported"): compute in float32.
        f32 = lambda x: x.astype(jnp.float32)
        return _xla(f32(q_BTNH), f32(k_BTKH), f32(v_BTKH), segment_ids_BT).astype(jnp.float16)
    if segment_ids_BT is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True)
    mask = causal_segment_mask(segment_ids_BT, q_BTNH.shape[1])
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_time(Tp, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, pad_segment):
    """Pad the length to Tp. Causality alone hides the padded keys from every real query (they
    come after it); padded queries see real keys and are sliced off. `pad_segment` None
    repeats each row's last id (keeps block min/max tight for blockwise)."""
    T = q_BTNH.shape[1]
    if Tp == T:
        return q_BTNH, k_BTKH, v_BTKH, segment_ids_BT
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
    if segment_ids_BT is not None:
        if pad_segment is None:
            segment_ids_BT = jnp.pad(segment_ids_BT, [(0, 0), (0, Tp - T)], mode="edge")
        else:
            segment_ids_BT = jnp.pad(segment_ids_BT, [(0, 0), (0, Tp - T)], constant_values=pad_segment)
    return pad(q_BTNH), pad(k_BTKH), pad(v_BTKH), segment_ids_BT


# ---------------------------------------------------------------------------------------
# blockwise: flash attention in pure JAX


def blockwise_tiles(T: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(query tile, key tile, padded length) blockwise uses for length T: the query tile is
    block_q (at most T), the length is padded to a multiple of it, and the key tile is the
    largest multiple of the query tile up to block_k that divides the padded length, so both
    tilings cover it exactly."""
    bq = min(block_q, T)
    Tp = _round_up(T, bq)
    bk = bq * max(d for d in range(1, max(block_k // bq, 1) + 1) if (Tp // bq) % d == 0)
    return bq, bk, Tp


def _blockwise(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_k):
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    bq, bk, Tp = blockwise_tiles(T, block_q, block_k)
    if bq == T:
        return _one_tile(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    q, k, v, seg = _pad_time(Tp, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, None)
    # Heads-major: per block and head, contiguous [block, H] tiles. Each kv head serves its
    # G query heads through the einsums; K/V are never repeated.
    q_BKGTH = q.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if seg is not None:
        seg = seg.astype(jnp.int32)
    out_BKGTH = _flash(q_BKGTH, k_BKTH, v_BKTH, seg, bq, bk)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]


def _one_tile(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """Blockwise attention when the whole sequence is one query tile: the dense products as
    batched row-major matmuls over [B, K], differentiated by JAX, without the tile loop's
    bookkeeping. On the CPU, value_and_grad on float32 [16, 128, 6, 64], one segment, median
    ms: 16.5 and 20.2 against 25.3 and 22.3 through the tile loop, 28.5 and 25.2 for xla;
    [8, 256, 6, 64]: 36.7 against 50.9, xla 58.9. The 8 x 256 step of `experiments.peers`:
    1,092 against 1,340 ms (at 16 x 128 the two were within the machine's noise)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # M = G * T
    k_BKHT, v_BKTH = k_BTKH.transpose(0, 2, 3, 1), v_BTKH.transpose(0, 2, 1, 3)
    s_BKGTT = jnp.matmul(q_BKMH, k_BKHT, preferred_element_type=jnp.float32).reshape(B, K, G, T, T)
    mask = causal_segment_mask(segment_ids_BT, T)[:, :, None]  # [B or 1, 1, 1, T, T]
    s_BKGTT = jnp.where(mask, s_BKGTT / math.sqrt(H), _MASKED)
    p_BKMT = jax.nn.softmax(s_BKGTT, axis=-1).astype(v_BTKH.dtype).reshape(B, K, G * T, T)
    out_BKMH = jnp.matmul(p_BKMT, v_BKTH, preferred_element_type=jnp.float32)
    out_BKGTH = out_BKMH.reshape(B, K, G, T, H)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BKGTH, k_BKTH, v_BKTH, seg_BT, bq, bk):
    return _flash_forward(q_BKGTH, k_BKTH, v_BKTH, seg_BT, bq, bk)[0]


def _flash_fwd(q_BKGTH, k_BKTH, v_BKTH, seg_BT, bq, bk):
    out_BKGTH, lse_BKGT = _flash_forward(q_BKGTH, k_BKTH, v_BKTH, seg_BT, bq, bk)
    return out_BKGTH, (q_BKGTH, k_BKTH, v_BKTH, seg_BT, out_BKGTH, lse_BKGT)


def _flash_bwd(bq, bk, residuals, dout_BKGTH):
    return (*_flash_backward(*residuals, dout_BKGTH, bq, bk), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


class _Blocks:
    """Block bookkeeping shared by the forward and backward passes: query tiles of bq rows,
    key tiles of bk = r * bq. Blocks span the whole batch (the batch axis stays an ordinary,
    shardable axis); a block pair is skipped when no row has a segment id in both blocks,
    judged by each block's id range per row.

    No tile reaches past the diagonal: query block i sees the first (i % r + 1) * bq keys of
    key block i // r, so that pair is computed on just those keys. With whole key tiles a
    quarter of the products at (256, 512) fell above the diagonal."""

    def __init__(self, seg_BT, T, bq, bk):
        self.bq, self.bk, self.r = bq, bk, bk // bq
        self.n_q, self.n_k = T // bq, T // bk
        self.seg_BT = seg_BT
        if seg_BT is not None:
            B = seg_BT.shape[0]
            seg_Bnq, seg_Bnk = seg_BT.reshape(B, self.n_q, bq), seg_BT.reshape(B, self.n_k, bk)
            lo_q, hi_q = seg_Bnq.min(axis=2)[:, :, None], seg_Bnq.max(axis=2)[:, :, None]
            lo_k, hi_k = seg_Bnk.min(axis=2)[:, None, :], seg_Bnk.max(axis=2)[:, None, :]
            self.overlap_qk = (jnp.maximum(lo_q, lo_k) <= jnp.minimum(hi_q, hi_k)).any(axis=0)

    def mask(self, i, j, width):
        """[B or 1, bq, width] visibility of key block j's first `width` keys to query block i."""
        keys = j * self.bk + jnp.arange(width)
        visible = (i * self.bq + jnp.arange(self.bq))[:, None] >= keys[None, :]
        if self.seg_BT is None:
            return visible[None]
        seg_q = lax.dynamic_slice_in_dim(self.seg_BT, i * self.bq, self.bq, axis=1)
        seg_k = lax.dynamic_slice_in_dim(self.seg_BT, j * self.bk, width, axis=1)
        return visible[None] & (seg_q[:, :, None] == seg_k[:, None, :])

    def skip_if_disjoint(self, i, j, compute, carry):
        """compute(carry), unless query block i and key block j share no segment in any row."""
        if self.seg_BT is None:
            return compute(carry)
        return lax.cond(self.overlap_qk[i, j], compute, lambda c: c, carry)


def _scores(q_BKGqH, k_BKsH, mask_Bqs, scale):
    s = jnp.einsum("BKGqH,BKsH->BKGqs", q_BKGqH, k_BKsH, preferred_element_type=jnp.float32)
    return jnp.where(mask_Bqs[:, None, None], s * scale, _MASKED)


def _flash_forward(q_BKGTH, k_BKTH, v_BKTH, seg_BT, bq, bk):
    B, K, G, T, H = q_BKGTH.shape
    scale = 1.0 / math.sqrt(H)
    blocks = _Blocks(seg_BT, T, bq, bk)

    def query_block(state):
        i, out_BKGTH, lse_BKGT = state
        q_i = lax.dynamic_slice_in_dim(q_BKGTH, i * bq, bq, axis=3)

        def visit(j, width, carry):
            """Online softmax over the first `width` keys of key block j."""
            def compute(carry):
                o, m, l = carry
                k_j = lax.dynamic_slice_in_dim(k_BKTH, j * bk, width, axis=2)
                v_j = lax.dynamic_slice_in_dim(v_BKTH, j * bk, width, axis=2)
                s = _scores(q_i, k_j, blocks.mask(i, j, width), scale)
                m_new = jnp.maximum(m, s.max(axis=-1))
                # A row that has seen no visible key yet has m_new = _MASKED and p = 1 on
                # masked keys; the block holding its own diagonal key comes last and the
                # correction exp(_MASKED - m) = 0 then wipes those terms.
                p = jnp.exp(s - m_new[..., None])
                correction = jnp.exp(m - m_new)
                pv = jnp.einsum("BKGqs,BKsH->BKGqH", p.astype(v_j.dtype), v_j,
                                preferred_element_type=jnp.float32)
                return o * correction[..., None] + pv, m_new, l * correction + p.sum(axis=-1)

            return blocks.skip_if_disjoint(i, j, compute, carry)

        init = (
            jnp.zeros((B, K, G, bq, H), jnp.float32),
            jnp.full((B, K, G, bq), _MASKED, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
        )
        # Whole key blocks below the diagonal, then the block holding it, up to it: a switch
        # over the r widths that keeps every shape static.
        diagonal = i // blocks.r
        carry = lax.fori_loop(0, diagonal, lambda j, c: visit(j, bk, c), init)
        up_to_diagonal = [functools.partial(visit, diagonal, (n + 1) * bq) for n in range(blocks.r)]
        o, m, l = lax.switch(i % blocks.r, up_to_diagonal, carry)
        o_i = (o / l[..., None]).astype(q_BKGTH.dtype)
        return (i + 1, lax.dynamic_update_slice_in_dim(out_BKGTH, o_i, i * bq, axis=3),
                lax.dynamic_update_slice_in_dim(lse_BKGT, m + jnp.log(l), i * bq, axis=3))

    # A while loop, not a scan: under an outer scan that is differentiated (the layer stack),
    # JAX splits a scan's body and would precompute every query block's masks as stacked
    # residuals, [n_q, B, K, G, bq, bk] of each, written and read back on every step.
    _, out_BKGTH, lse_BKGT = lax.while_loop(
        lambda state: state[0] < blocks.n_q, query_block,
        (0, jnp.zeros_like(q_BKGTH), jnp.zeros((B, K, G, T), jnp.float32)),
    )
    return out_BKGTH, lse_BKGT


def _flash_backward(q_BKGTH, k_BKTH, v_BKTH, seg_BT, out_BKGTH, lse_BKGT, dout_BKGTH, bq, bk):
    B, K, G, T, H = q_BKGTH.shape
    scale = 1.0 / math.sqrt(H)
    blocks = _Blocks(seg_BT, T, bq, bk)
    f32 = jnp.float32
    delta_BKGT = jnp.sum(dout_BKGTH.astype(f32) * out_BKGTH.astype(f32), axis=-1)
    # Tiles are held transposed, [keys, queries], and dq is accumulated as [H, queries]: then
    # every product reads its large operand in the layout the CPU's matmul takes as is. With
    # [queries, keys] tiles XLA copied p and ds transposed for dk and dv on every tile pair, and
    # value_and_grad on [2, 2048, 6, 64] took a fifth longer.

    def key_block(dqT_BKHGT, j):
        k_j = lax.dynamic_slice_in_dim(k_BKTH, j * bk, bk, axis=2)
        kT_j = k_j.transpose(0, 1, 3, 2)
        v_j = lax.dynamic_slice_in_dim(v_BKTH, j * bk, bk, axis=2)

        def visit(i, width, carry):
            """Gradients from query block i and the first `width` keys of key block j."""
            def compute(carry):
                dqT, dk, dv = carry
                k_w, kT_w, v_w = k_j[:, :, :width], kT_j[..., :width], v_j[:, :, :width]
                q_i = lax.dynamic_slice_in_dim(q_BKGTH, i * bq, bq, axis=3)
                do_i = lax.dynamic_slice_in_dim(dout_BKGTH, i * bq, bq, axis=3)
                lse_i = lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, axis=3)[:, :, None]
                delta_i = lax.dynamic_slice_in_dim(delta_BKGT, i * bq, bq, axis=3)[:, :, None]
                mask_Bsq = jnp.swapaxes(blocks.mask(i, j, width), 1, 2)
                s = jnp.einsum("BKsH,BKGqH->BKsGq", k_w, q_i, preferred_element_type=f32)
                p = jnp.exp(jnp.where(mask_Bsq[:, None, :, None], s * scale, _MASKED) - lse_i)
                dv_w = jnp.einsum("BKsGq,BKGqH->BKsH", p.astype(do_i.dtype), do_i,
                                  preferred_element_type=f32)
                dp = jnp.einsum("BKsH,BKGqH->BKsGq", v_w, do_i, preferred_element_type=f32)
                ds = (p * (dp - delta_i) * scale).astype(q_i.dtype)
                dk_w = jnp.einsum("BKsGq,BKGqH->BKsH", ds, q_i, preferred_element_type=f32)
                dqT_i = lax.dynamic_slice_in_dim(dqT, i * bq, bq, axis=4)
                dqT_i += jnp.einsum("BKHs,BKsGq->BKHGq", kT_w, ds, preferred_element_type=f32)
                dqT = lax.dynamic_update_slice_in_dim(dqT, dqT_i, i * bq, axis=4)
                return dqT, dk.at[:, :, :width].add(dk_w), dv.at[:, :, :width].add(dv_w)

            return blocks.skip_if_disjoint(i, j, compute, carry)

        zeros = jnp.zeros((B, K, bk, H), f32)
        carry = (dqT_BKHGT, zeros, zeros)
        # Query blocks above the diagonal never see key block j; the first r - 1 that do see
        # only its first tiles.
        first = j * blocks.r
        for n in range(blocks.r - 1):
            carry = visit(first + n, (n + 1) * bq, carry)
        dqT_BKHGT, dk, dv = lax.fori_loop(
            first + blocks.r - 1, blocks.n_q, lambda i, c: visit(i, bk, c), carry
        )
        return dqT_BKHGT, (dk, dv)

    dqT_BKHGT, (dk_nBKsH, dv_nBKsH) = lax.scan(
        key_block, jnp.zeros((B, K, H, G, T), f32), jnp.arange(blocks.n_k)
    )
    to_BKTH = lambda x: jnp.moveaxis(x, 0, 2).reshape(B, K, T, H)
    return (dqT_BKHGT.transpose(0, 1, 3, 4, 2).astype(q_BKGTH.dtype),
            to_BKTH(dk_nBKsH).astype(k_BKTH.dtype), to_BKTH(dv_nBKsH).astype(v_BKTH.dtype))


# ---------------------------------------------------------------------------------------
# Pallas kernels


def _pallas_gpu(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_k, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, T, N, H = q_BTNH.shape
    G = N // k_BTKH.shape[2]
    # Triton tiles are powers of two; the kernel needs T a multiple of each tile.
    tile = lambda size: max(16, min(pow(2, (size - 1).bit_length()), pow(2, (T - 1).bit_length())))
    bq, bk = tile(block_q), tile(block_k)
    q, k, v, seg = _pad_time(_round_up(T, max(bq, bk)), q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, -1)
    if G > 1:  # the kernel wants as many kv heads as query heads
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    backward = min(bq, bk, PALLAS_GPU_BACKWARD_BLOCK)
    sizes = gpu_attention.BlockSizes(
        block_q=bq, block_k=bk, block_q_dkv=backward, block_kv_dkv=backward,
        block_q_dq=backward, block_kv_dq=backward,
    )
    out = gpu_attention.mha(
        q, k, v, None if seg is None else seg.astype(jnp.int32), sm_scale=1.0 / math.sqrt(H),
        causal=True, block_sizes=sizes, num_warps=PALLAS_GPU_WARPS, num_stages=PALLAS_GPU_STAGES,
        interpret=interpret,
    )
    return out[:, :T].astype(q_BTNH.dtype)


def run_starts(segment_ids_BT):
    """[B, T] bool: True where a run of equal segment ids begins (every row's first slot)."""
    first_B1 = jnp.ones_like(segment_ids_BT[:, :1], bool)
    return jnp.concatenate([first_B1, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def segment_runs(segment_ids_BT, max_runs: int):
    """Each row's runs of equal segment id in cuDNN's packed layout, for rows of at most
    `max_runs` runs: (lengths [B, max_runs], starts [B, max_runs + 1]), both int32 and -1 past
    the row's last run. Padding (id 0) is a run of its own, so every position is in one."""
    T = segment_ids_BT.shape[1]
    # Run starts, then T: the length of the last run is T minus its start.
    first_slots = lambda row: jnp.nonzero(row, size=max_runs + 1, fill_value=T)[0]
    starts_BR = jax.vmap(first_slots)(run_starts(segment_ids_BT))
    lengths_BR = jnp.diff(starts_BR, axis=1)
    lengths_BR = jnp.where(starts_BR[:, :-1] < T, lengths_BR, -1)
    return lengths_BR.astype(jnp.int32), jnp.where(starts_BR < T, starts_BR, -1).astype(jnp.int32)


def _cudnn_gpu(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"model.attention='cudnn_gpu' takes bfloat16 or float16 inputs, not {q_BTNH.dtype}; "
            "use model.dtype='bfloat16' or model.attention='pallas_gpu'"
        )
    if segment_ids_BT is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn")
    # Every run is a sequence of its own with a causal mask: a row of T positions has at
    # most T runs, so no row can have more runs than the layout holds.
    lengths_BR, starts_BR = segment_runs(segment_ids_BT, q_BTNH.shape[1])
    G = q_BTNH.shape[2] // k_BTKH.shape[2]
    if G > 1:  # jax converts both offsets to elements with the query's head count
        k_BTKH, v_BTKH = jnp.repeat(k_BTKH, G, axis=2), jnp.repeat(v_BTKH, G, axis=2)
    return cudnn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, q_seqlen=lengths_BR, kv_seqlen=lengths_BR, q_offsets=starts_BR,
        kv_offsets=starts_BR, scale=1.0 / math.sqrt(q_BTNH.shape[-1]),
        mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


def _splash_tpu(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q, block_k, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q_BTNH.shape
    # Splash tiles are multiples of 128 lanes and must divide T.
    bq, bk = (min(_round_up(size, 128), _round_up(T, 128)) for size in (block_q, block_k))
    q, k, v, seg = _pad_time(_round_up(T, math.lcm(bq, bk)), q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, -1)
    Tp = q.shape[1]
    mask = splash.MultiHeadMask([splash.CausalMask((Tp, Tp))] * N)
    sizes = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
    )
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    # Splash applies no softmax scale: scale q in float32, then back to its dtype.
    q = (q.astype(jnp.float32) / math.sqrt(H)).astype(q.dtype)
    q_BNTH, k_BKTH, v_BKTH = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if seg is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    else:
        seg = seg.astype(jnp.int32)
        ids = splash.SegmentIds(q=seg, kv=seg)
        out_BNTH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q_BNTH, k_BKTH, v_BKTH, ids)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :T].astype(q_BTNH.dtype)
