"""Write a model as a Hugging Face directory that `transformers` (and lm-eval-harness, vLLM,
TRL) load: `config.json`, `model.safetensors` (float32) and, given one, the SentencePiece
tokenizer as `tokenizer.model` with a `tokenizer_config.json` naming `LlamaTokenizer`, its
BOS, EOS and PAD ids in `config.json` and `generation_config.json`.

    python -m model.export --workdir=runs/quickstart --out=runs/quickstart/hf

exports the newest checkpoint of a pretraining or post-training workdir (LoRA adapters merged)
with the run's tokenizer. The tensor layout is the inverse of `model.hf.from_hf`: importing an
export gives back the same parameters (the embedding and head are written without the rows
of padded ids, which are zero).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import sentencepiece as spm
from absl import flags
from etils import epath
from safetensors.numpy import save_file

from model import sharding
from model.config import ModelConfig
from model.transformer import layer_params


def family(config: ModelConfig) -> str:
    """'gpt2' or 'llama': the Hugging Face architecture that computes the same function."""
    if (config.norm, config.mlp, config.positions, config.use_bias) == ("layernorm", "gelu", "learned", True):
        if config.n_kv_heads != config.n_heads or config.head_dim * config.n_heads != config.d_model:
            raise ValueError("a GPT-2 model exports only with n_kv_heads == n_heads and head_dim * n_heads == d_model")
        return "gpt2"
    if (config.norm, config.mlp, config.positions, config.use_bias) == ("rmsnorm", "swiglu", "rope", False):
        return "llama"
    raise ValueError(
        f"no Hugging Face architecture computes norm={config.norm!r}, mlp={config.mlp!r}, "
        f"positions={config.positions!r}, use_bias={config.use_bias}: export takes the GPT-2 and Llama families"
    )


def to_hf(config: ModelConfig, params, out: pathlib.Path, tokenizer_model: epath.PathLike | None = None) -> None:
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where the directory should be
        raise ValueError(f"--out={out}: {error.strerror or error}") from None
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
    V = config.vocab_size  # the rows of padded ids are not written
    params = {k: a[:V] if k in ("embedding", "head") else a for k, a in params.items()}
    layers = layer_params(config, params)
    kind = family(config)
    hf_config, tensors = (_gpt2 if kind == "gpt2" else _llama)(config, params, layers)
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = params["head"]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_model is not None:
        model_proto = epath.Path(tokenizer_model).read_bytes()  # the workdir may be on an object store
        (out / "tokenizer.model").write_bytes(model_proto)
        pieces = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = {name: i for name, i in (
            ("bos", pieces.bos_id()), ("eos", pieces.eos_id()), ("pad", pieces.pad_id()), ("unk", pieces.unk_id()),
        ) if i >= 0}
        # No prefix space: the text is encoded exactly as this project's tokenizer encodes it
        # (except a literal U+2581, which LlamaTokenizer reads as a space).
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "legacy": False, "add_prefix_space": False, **{f"{name}_token": pieces.id_to_piece(i) for name, i in ids.items()},
        }, indent=2))
        # Without them transformers falls back to its own defaults (Llama's EOS is 2, this
        # tokenizer's BOS), and generation would not stop at this tokenizer's EOS.
        token_ids = {f"{name}_token_id": i for name, i in ids.items() if name != "unk"}
        hf_config.update(token_ids)
        (out / "generation_config.json").write_text(json.dumps(token_ids, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))


def _gpt2(config: ModelConfig, params, layers) -> tuple[dict, dict]:
    D = config.d_model
    tensors = {
        "transformer.wte.weight": params["embedding"],
        "transformer.wpe.weight": params["position_embedding"],
        "transformer.ln_f.weight": params["final_norm"]["scale"],
        "transformer.ln_f.bias": params["final_norm"]["bias"],
    }
    for i, layer in enumerate(layers):
        p, attn, mlp = f"transformer.h.{i}.", layer["attn"], layer["mlp"]
        tensors.update({
            p + "ln_1.weight": layer["attn_norm"]["scale"], p + "ln_1.bias": layer["attn_norm"]["bias"],
            p + "attn.c_attn.weight": np.concatenate([attn[n].reshape(D, D) for n in ("q", "k", "v")], axis=1),
            p + "attn.c_attn.bias": np.concatenate([attn[n + "_bias"].reshape(D) for n in ("q", "k", "v")]),
            p + "attn.c_proj.weight": attn["o"].reshape(D, D), p + "attn.c_proj.bias": attn["o_bias"],
            p + "ln_2.weight": layer["mlp_norm"]["scale"], p + "ln_2.bias": layer["mlp_norm"]["bias"],
            p + "mlp.c_fc.weight": mlp["up"], p + "mlp.c_fc.bias": mlp["up_bias"],
            p + "mlp.c_proj.weight": mlp["down"], p + "mlp.c_proj.bias": mlp["down_bias"],
        })
    hf_config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len, "n_embd": D, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": config.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    }
    return hf_config, tensors


def _llama(config: ModelConfig, params, layers) -> tuple[dict, dict]:
    D, H = config.d_model, config.head_dim
    tensors = {"model.embed_tokens.weight": params["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
    for i, layer in enumerate(layers):
        p, attn, mlp = f"model.layers.{i}.", layer["attn"], layer["mlp"]
        # Our kernels are [in, out]; torch Linear stores [out, in].
        tensors.update({
            p + "input_layernorm.weight": layer["attn_norm"]["scale"],
            p + "self_attn.q_proj.weight": attn["q"].reshape(D, config.n_heads * H).T,
            p + "self_attn.k_proj.weight": attn["k"].reshape(D, config.n_kv_heads * H).T,
            p + "self_attn.v_proj.weight": attn["v"].reshape(D, config.n_kv_heads * H).T,
            p + "self_attn.o_proj.weight": attn["o"].reshape(config.n_heads * H, D).T,
            p + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
            p + "mlp.gate_proj.weight": mlp["gate"].T, p + "mlp.up_proj.weight": mlp["up"].T,
            p + "mlp.down_proj.weight": mlp["down"].T,
        })
    hf_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": D, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": H,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    return hf_config, tensors


def main(argv):
    del argv
    from align import source  # a run's checkpoint and tokenizer, as post-training starts from them

    workdir = epath.Path(flags.FLAGS.workdir)
    start = source.from_workdir(workdir, setting="--workdir")
    params = start.load_params(sharding.make_mesh((-1, 1, 1), model_config=start.model_config))
    out = pathlib.Path(flags.FLAGS.out)
    to_hf(start.model_config, params, out, workdir / source.TOKENIZER_FILE)
    print(f"{start.description} -> {out} ({family(start.model_config)})")


if __name__ == "__main__":
    from train.cli import run_program

    flags.DEFINE_string("workdir", None, "A run's workdir: its newest checkpoint is exported.", required=True)
    flags.DEFINE_string("out", None, "The Hugging Face directory to write.", required=True)
    run_program(main)
