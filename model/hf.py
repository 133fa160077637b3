"""Load local Hugging Face GPT-2 and Llama checkpoints (config.json + safetensors).

No network access: `path` is a directory written by `save_pretrained`.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from model.config import ModelConfig


def from_hf(path) -> tuple[ModelConfig, dict]:
    """(config, params) of a local checkpoint. A config field that changes the function and
    is not implemented here is refused by name; every tensor is checked against the name and
    shape the config implies, and tensors left unused are an error. The embedding and head
    get zero rows for the padded ids (`ModelConfig.padded_vocab_size`)."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        config = _gpt2_config(hf, config_file)
        read = _gpt2_params
    elif model_type == "llama":
        config = _llama_config(hf, config_file)
        read = _llama_params
    else:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported (gpt2, llama)")
    tensors = _Tensors(path)
    layers, top = read(config, tensors)
    tensors.check_all_taken()
    padding = ((0, config.padded_vocab_size - config.vocab_size), (0, 0))
    params = {k: np.pad(a, padding) if k in ("embedding", "head") else a for k, a in top.items()}
    if config.scan_layers:
        params["layers"] = _stack(layers)
    else:
        params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    dtype = jnp.dtype(config.param_dtype)
    return config, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


class _Tensors:
    """The checkpoint's tensors, handed out by name with their shape checked."""

    # Buffers some checkpoints carry that are not parameters: GPT-2's causal-mask constants,
    # Llama's rotary frequencies (both recomputed here).
    _BUFFERS = re.compile(r"(\.attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

    def __init__(self, path: pathlib.Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")
        self.path = path
        self.tensors = {}
        for file in files:
            # The flax framework reads bfloat16 checkpoints too (numpy has no bfloat16).
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    self.tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
        self.taken = {name for name in self.tensors if self._BUFFERS.search(name)}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"{self.path}: tensor {name!r} (shape {shape}) is missing")
        tensor = self.tensors[name]
        if tensor.shape != tuple(shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} has shape {tensor.shape}; the config implies {tuple(shape)}"
            )
        self.taken.add(name)
        return tensor

    def check_all_taken(self) -> None:
        unused = sorted(set(self.tensors) - self.taken)
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            raise ValueError(f"{self.path}: tensors the config does not use: {shown}")


def _refuse(config_file: pathlib.Path, hf: dict, field: str, supported) -> None:
    """Refuse a config field whose value this model does not implement."""
    value = hf.get(field, supported[0])
    if value not in supported:
        raise ValueError(
            f"{config_file}: {field}={value!r} is not supported (supported: "
            f"{', '.join(repr(v) for v in supported)})"
        )


def _gpt2_config(hf: dict, config_file: pathlib.Path) -> ModelConfig:
    _refuse(config_file, hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
    _refuse(config_file, hf, "scale_attn_weights", (True,))
    _refuse(config_file, hf, "scale_attn_by_inverse_layer_idx", (False,))
    _refuse(config_file, hf, "add_cross_attention", (False,))
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
        positions="learned", tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=True,
    )


def _gpt2_params(config: ModelConfig, t: _Tensors) -> tuple[list, dict]:
    D, N, H, F = config.d_model, config.n_heads, config.head_dim, config.d_ff
    prefix = "transformer." if "transformer.wte.weight" in t else ""
    layers = []
    for i in range(config.n_layers):
        p = f"{prefix}h.{i}."
        q, k, v = np.split(t.take(p + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
        qb, kb, vb = np.split(t.take(p + "attn.c_attn.bias", (3 * D,)), 3)
        layers.append({
            "attn_norm": {"scale": t.take(p + "ln_1.weight", (D,)), "bias": t.take(p + "ln_1.bias", (D,))},
            "attn": {
                "q": q.reshape(D, N, H), "k": k.reshape(D, N, H), "v": v.reshape(D, N, H),
                "q_bias": qb.reshape(N, H), "k_bias": kb.reshape(N, H), "v_bias": vb.reshape(N, H),
                "o": t.take(p + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                "o_bias": t.take(p + "attn.c_proj.bias", (D,)),
            },
            "mlp_norm": {"scale": t.take(p + "ln_2.weight", (D,)), "bias": t.take(p + "ln_2.bias", (D,))},
            "mlp": {
                "up": t.take(p + "mlp.c_fc.weight", (D, F)), "up_bias": t.take(p + "mlp.c_fc.bias", (F,)),
                "down": t.take(p + "mlp.c_proj.weight", (F, D)), "down_bias": t.take(p + "mlp.c_proj.bias", (D,)),
            },
        })
    top = {
        "embedding": t.take(prefix + "wte.weight", (config.vocab_size, D)),
        "position_embedding": t.take(prefix + "wpe.weight", (config.max_seq_len, D)),
        "final_norm": {"scale": t.take(prefix + "ln_f.weight", (D,)), "bias": t.take(prefix + "ln_f.bias", (D,))},
    }
    _head(config, t, top)
    return layers, top


def _llama_config(hf: dict, config_file: pathlib.Path) -> ModelConfig:
    _refuse(config_file, hf, "hidden_act", ("silu",))
    _refuse(config_file, hf, "attention_bias", (False,))
    _refuse(config_file, hf, "mlp_bias", (False,))
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{config_file}: rope_scaling with rope_type {rope_type!r} is not supported (default only)")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", positions="rope",
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
        tie_embeddings=hf.get("tie_word_embeddings", False), use_bias=False,
        head_dim=hf.get("head_dim") or 0,
    )


def _llama_params(config: ModelConfig, t: _Tensors) -> tuple[list, dict]:
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        # torch Linear stores [out, in]; our kernels are [in, out].
        layers.append({
            "attn_norm": {"scale": t.take(p + "input_layernorm.weight", (D,))},
            "attn": {
                "q": t.take(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H),
                "k": t.take(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H),
                "v": t.take(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H),
                "o": t.take(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D),
            },
            "mlp_norm": {"scale": t.take(p + "post_attention_layernorm.weight", (D,))},
            "mlp": {
                "gate": t.take(p + "mlp.gate_proj.weight", (F, D)).T,
                "up": t.take(p + "mlp.up_proj.weight", (F, D)).T,
                "down": t.take(p + "mlp.down_proj.weight", (D, F)).T,
            },
        })
    top = {
        "embedding": t.take("model.embed_tokens.weight", (config.vocab_size, D)),
        "final_norm": {"scale": t.take("model.norm.weight", (D,))},
    }
    _head(config, t, top)
    return layers, top


def _head(config: ModelConfig, t: _Tensors, top: dict) -> None:
    """The untied output head; a tied checkpoint may still store it, equal to the embedding."""
    shape = (config.vocab_size, config.d_model)
    if not config.tie_embeddings:
        top["head"] = t.take("lm_head.weight", shape)
    elif "lm_head.weight" in t and not np.array_equal(t.take("lm_head.weight", shape), top["embedding"]):
        raise ValueError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from the embedding")


def _stack(layers: list[dict]) -> dict:
    return {
        key: _stack([layer[key] for layer in layers]) if isinstance(layers[0][key], dict)
        else np.stack([layer[key] for layer in layers])
        for key in layers[0]
    }
