"""Load local Hugging Face GPT-2 and Llama checkpoints (config.json + safetensors).

No network access: `path` is a directory written by `save_pretrained`.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from model.config import ModelConfig


def from_hf(path) -> tuple[ModelConfig, dict]:
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        config = _gpt2_config(hf)
        layers, top = _gpt2_params(config, _load_tensors(path))
    elif model_type == "llama":
        config = _llama_config(hf, config_file)
        layers, top = _llama_params(config, _load_tensors(path))
    else:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported (gpt2, llama)")
    params = dict(top)
    if config.scan_layers:
        params["layers"] = _stack(layers)
    else:
        params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    dtype = jnp.dtype(config.param_dtype)
    return config, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _load_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors = {}
    for file in files:
        # The flax framework reads bfloat16 checkpoints too (numpy has no bfloat16).
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return tensors


def _gpt2_config(hf: dict) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation_function {activation!r} is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
        positions="learned", tie_embeddings=True, use_bias=True,
    )


def _gpt2_params(config: ModelConfig, t: dict) -> tuple[list, dict]:
    D, N, H = config.d_model, config.n_heads, config.head_dim
    prefix = "transformer." if "transformer.wte.weight" in t else ""
    layers = []
    for i in range(config.n_layers):
        p = f"{prefix}h.{i}."
        q, k, v = np.split(t[p + "attn.c_attn.weight"], 3, axis=1)
        qb, kb, vb = np.split(t[p + "attn.c_attn.bias"], 3)
        layers.append({
            "attn_norm": {"scale": t[p + "ln_1.weight"], "bias": t[p + "ln_1.bias"]},
            "attn": {
                "q": q.reshape(D, N, H), "k": k.reshape(D, N, H), "v": v.reshape(D, N, H),
                "q_bias": qb.reshape(N, H), "k_bias": kb.reshape(N, H), "v_bias": vb.reshape(N, H),
                "o": t[p + "attn.c_proj.weight"].reshape(N, H, D), "o_bias": t[p + "attn.c_proj.bias"],
            },
            "mlp_norm": {"scale": t[p + "ln_2.weight"], "bias": t[p + "ln_2.bias"]},
            "mlp": {
                "up": t[p + "mlp.c_fc.weight"], "up_bias": t[p + "mlp.c_fc.bias"],
                "down": t[p + "mlp.c_proj.weight"], "down_bias": t[p + "mlp.c_proj.bias"],
            },
        })
    top = {
        "embedding": t[prefix + "wte.weight"],
        "position_embedding": t[prefix + "wpe.weight"],
        "final_norm": {"scale": t[prefix + "ln_f.weight"], "bias": t[prefix + "ln_f.bias"]},
    }
    return layers, top


def _llama_config(hf: dict, config_file: pathlib.Path) -> ModelConfig:
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{config_file}: rope_type {rope_type!r} is not supported (default only)")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise ValueError(f"{config_file}: attention_bias/mlp_bias are not supported for llama")
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


def _llama_params(config: ModelConfig, t: dict) -> tuple[list, dict]:
    D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        # torch Linear stores [out, in]; our kernels are [in, out].
        layers.append({
            "attn_norm": {"scale": t[p + "input_layernorm.weight"]},
            "attn": {
                "q": t[p + "self_attn.q_proj.weight"].T.reshape(D, N, H),
                "k": t[p + "self_attn.k_proj.weight"].T.reshape(D, K, H),
                "v": t[p + "self_attn.v_proj.weight"].T.reshape(D, K, H),
                "o": t[p + "self_attn.o_proj.weight"].T.reshape(N, H, D),
            },
            "mlp_norm": {"scale": t[p + "post_attention_layernorm.weight"]},
            "mlp": {
                "gate": t[p + "mlp.gate_proj.weight"].T,
                "up": t[p + "mlp.up_proj.weight"].T,
                "down": t[p + "mlp.down_proj.weight"].T,
            },
        })
    top = {"embedding": t["model.embed_tokens.weight"], "final_norm": {"scale": t["model.norm.weight"]}}
    if not config.tie_embeddings:
        top["head"] = t["lm_head.weight"].T
    return layers, top


def _stack(layers: list[dict]) -> dict:
    return {
        key: _stack([layer[key] for layer in layers]) if isinstance(layers[0][key], dict)
        else np.stack([layer[key] for layer in layers])
        for key in layers[0]
    }
