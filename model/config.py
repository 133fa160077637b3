"""Model configuration, named presets, parameter counts and training FLOPs per token.

One config covers the GPT-2 family (LayerNorm, GELU, learned positions, tied embeddings,
biases) and the Llama family (RMSNorm, SwiGLU, RoPE, GQA, untied output).

`vocab_size` is the tokenizer's vocabulary; the embedding and head store
`padded_vocab_size` rows, the next multiple of `VOCAB_MULTIPLE` (GPT-2's 50,257 -> 50,304,
as nanoGPT pads it), so the head matmul tiles evenly and the vocab axis divides over a
tensor mesh axis. The padded ids' logits are masked (`model.transformer.output_logits`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from model import attention

VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "swiglu" | "gelu" (tanh approximation, as GPT-2)
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    use_bias: bool = False
    head_dim: int = 0  # 0: d_model // n_heads
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype of matmuls; logits and softmax stay float32
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs, recompute the rest)
    scan_layers: bool = True
    attention: str = "auto"  # model/attention.py: "auto" | "xla" | "blockwise" | "pallas_gpu" | "cudnn_gpu" | "splash_tpu"

    def __post_init__(self):
        choices = {
            "norm": ("rmsnorm", "layernorm"),
            "mlp": ("swiglu", "gelu"),
            "positions": ("rope", "learned"),
            "remat": ("none", "full", "dots"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16"),
            "attention": attention.IMPLEMENTATIONS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if not self.head_dim:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: `vocab_size` rounded up to `VOCAB_MULTIPLE`."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "ModelConfig":
        if "d_model" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", 0)
        return dataclasses.replace(self, **changes)


def _gpt2(d_model, n_layers, n_heads, **kw):
    return ModelConfig(
        vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_heads, d_ff=4 * d_model, max_seq_len=1024, norm="layernorm",
        mlp="gelu", positions="learned", tie_embeddings=True, use_bias=True, **kw,
    )


def _llama(vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq_len, **kw):
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max_seq_len, norm="rmsnorm",
        mlp="swiglu", positions="rope", tie_embeddings=False, use_bias=False, **kw,
    )


PRESETS = {
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-350m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    # A few million parameters: CPU tests and the quickstart.
    "llama-tiny": _llama(4096, 256, 4, 8, 2, 768, 512),
    # Llama-style ~160M (SmolLM-135M-like shape, untied, GQA).
    "llama-small": _llama(32768, 768, 12, 12, 4, 2048, 2048),
    # Llama-style ~1B (Llama 3.2 1B shape with a 32k vocabulary).
    "llama-1b": _llama(32768, 2048, 16, 32, 8, 8192, 4096, rope_theta=500_000.0),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts: `total`, and `nonembedding` (total minus the token and learned
    position embedding tables and an untied output head, as Kaplan et al. count N). Counts
    what is stored: the embedding and head at `padded_vocab_size` rows."""
    d, h = config.d_model, config.head_dim
    q_dim, kv_dim = config.n_heads * h, config.n_kv_heads * h
    bias = config.use_bias
    attention = d * (q_dim + 2 * kv_dim) + q_dim * d + bias * (q_dim + 2 * kv_dim + d)
    n_mlp_in = 2 if config.mlp == "swiglu" else 1
    mlp = n_mlp_in * d * config.d_ff + config.d_ff * d + bias * (config.d_ff + d)  # no gate bias
    norm = d * (2 if config.norm == "layernorm" and bias else 1)
    layer = attention + mlp + 2 * norm
    body = config.n_layers * layer + norm  # + final norm
    token_embedding = config.padded_vocab_size * d
    position_embedding = config.max_seq_len * d if config.positions == "learned" else 0
    head = 0 if config.tie_embeddings else config.padded_vocab_size * d
    total = body + token_embedding + position_embedding + head
    return {"total": total, "nonembedding": body}


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward), PaLM appendix B / Chinchilla style.

    `6N + 12 L d_attn T`: 6 FLOPs per matmul parameter N (2 forward, 4 backward), where N
    is every parameter except the input embedding tables (the output head is a matmul, so
    it counts once, tied or not), plus the attention scores and values over a context of T
    tokens (12 L d_attn T with d_attn = n_heads * head_dim; the causal half is not
    subtracted, matching PaLM's MFU accounting). The head counts at `vocab_size`, not the
    padded rows: their logits are computed and masked, work that is not useful, so MFU does
    not credit it. Also returned: the two common simplifications, 6 * total parameters and
    6 * non-embedding parameters (as stored, padding included).
    """
    counts = param_counts(config)
    matmul_params = counts["nonembedding"] + config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return {
        "total": 6 * matmul_params + attention,
        "attention": attention,
        "6n_total": 6 * counts["total"],
        "6n_nonembedding": 6 * counts["nonembedding"],
    }


SHAPE_TOLERANCE = 0.15  # how far a shape's parameter count may miss its target


def shape_for_params(
    n_params: float,
    *,
    vocab_size: int = 32768,
    max_seq_len: int = 2048,
    aspect_ratio: float = 64.0,
    head_dim: int = 64,
    count: str = "total",
    **overrides,
) -> ModelConfig:
    """A Llama-style shape with about `n_params` parameters (`count`: total|nonembedding).

    Widths are multiples of `head_dim` and d_model / n_layers stays near `aspect_ratio`
    (Kaplan et al. find loss flat over a wide range of aspect ratios). Among the shapes
    within a factor 2 of that ratio, the one closest in log-parameters wins.
    """
    if count not in ("total", "nonembedding"):
        raise ValueError(f"count={count!r}: expected 'total' or 'nonembedding'")
    best, best_key = None, None
    for n_layers in range(1, 97):
        for width_units in range(1, 129):
            d_model = width_units * head_dim
            ratio = d_model / n_layers
            if not aspect_ratio / 2 <= ratio <= aspect_ratio * 2:
                continue
            n_heads = width_units
            n_kv_heads = max(1, n_heads // 4) if n_heads % 4 == 0 else n_heads
            d_ff = head_dim * math.ceil(8 * d_model / 3 / head_dim)
            candidate = _llama(
                vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq_len, **overrides
            )
            error = abs(math.log(param_counts(candidate)[count] / n_params))
            key = (round(error, 2), abs(math.log(ratio / aspect_ratio)))
            if best_key is None or key < best_key:
                best, best_key = candidate, key
    found = param_counts(best)[count] if best else 0
    if not found or abs(math.log(found / n_params)) > math.log(1 + SHAPE_TOLERANCE):
        raise ValueError(
            f"n_params={n_params:,.0f}: no shape with these settings comes within {SHAPE_TOLERANCE:.0%} "
            f"(the nearest has {found:,} {count} parameters); change the target, head_dim or aspect_ratio"
        )
    return best
