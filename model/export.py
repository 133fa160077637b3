"""Write a model as a Hugging Face directory that `transformers` (and lm-eval-harness, vLLM,
TRL) load: `config.json`, `model.safetensors` (float32) and, given one, the SentencePiece
tokenizer: as `tokenizer.json` for `transformers` (`hf_tokenizer`), as `tokenizer.model` for
tools that read SentencePiece, its BOS, EOS and PAD ids in `config.json` and
`generation_config.json`.

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
import tokenizers
from absl import flags
from etils import epath
from safetensors.numpy import save_file
from sentencepiece import sentencepiece_model_pb2

from model import sharding
from model.config import ModelConfig
from model.transformer import layer_params


_SPACE = "\u2581"  # SentencePiece's symbol for a space
# What the exported pieces use for a space instead: a Unicode noncharacter, which no text for
# interchange holds. With the symbol itself, `tokenizers` would read a literal U+2581 in a
# text as a space (SentencePiece does too; `data.tokenizer` encodes it as its bytes).
_SPACE_STAND_IN = "\ufdd0"


def hf_tokenizer(model_proto: bytes) -> tokenizers.Tokenizer:
    """The SentencePiece model as a `tokenizers` pipeline that encodes every text as
    `data.tokenizer.Tokenizer` does (BOS first), and decodes as it does: its BPE or unigram
    model, byte fallback, no normalization and no prefix space."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    pieces = [p.piece.replace(_SPACE, _SPACE_STAND_IN) if p.type == normal else p.piece for p in proto.pieces]
    unk = proto.trainer_spec.unk_id
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = tokenizers.models.BPE(
            vocab, _merges(pieces, [p.score for p in proto.pieces]), unk_token=pieces[unk], fuse_unk=True, byte_fallback=True,
        )
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        # SentencePiece never matches a control or byte piece in text; `tokenizers` has no
        # piece types, so they score below any segmentation into normal pieces.
        lowest = min(p.score for p in proto.pieces if p.type == normal) - 1e4
        scores = [p.score if p.type == normal else lowest for p in proto.pieces]
        model = tokenizers.models.Unigram(list(zip(pieces, scores)), unk_id=unk, byte_fallback=True)
    else:
        raise ValueError(f"export: a {proto.trainer_spec.model_type} SentencePiece model; export takes BPE and unigram")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement=_SPACE_STAND_IN, prepend_scheme="never", split=False)
    tokenizer.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace(_SPACE_STAND_IN, " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse(),
    ])
    specials = [i for i in (proto.trainer_spec.pad_id, unk, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id) if i >= 0]
    tokenizer.add_special_tokens([tokenizers.AddedToken(pieces[i], special=True, normalized=False) for i in specials])
    bos = pieces[proto.trainer_spec.bos_id]
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)],
    )
    return tokenizer


def _merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges in the order SentencePiece applies them: every split of a piece into two
    pieces, ranked by the merged piece's score (SentencePiece merges the best-scoring pair
    first), the splits of one piece by their halves' ids."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for merged, score in zip(pieces, scores):
        splits = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in ids and merged[k:] in ids]
        ranked += [(-score, ids[left], ids[right], left, right) for left, right in splits]
    return [(left, right) for *_, left, right in sorted(ranked)]


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
        hf_tokenizer(model_proto).save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            # "<s>" in a text is text, as this project's tokenizer reads it.
            "split_special_tokens": True, "clean_up_tokenization_spaces": False,
            "model_max_length": config.max_seq_len,
            **{f"{name}_token": pieces.id_to_piece(i) for name, i in ids.items()},
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
