"""Logits parity with Hugging Face `transformers` models built from small random configs."""

import json

import numpy as np
import pytest
import torch
import transformers

import model

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 17))


def _reference_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(TOKENS)).logits.float().numpy()


def _our_logits(tmp_path, hf_model, **overrides):
    hf_model.save_pretrained(tmp_path)
    config, params = model.from_hf(tmp_path)
    config = config.replace(**overrides)
    if not config.scan_layers:
        config, params = _unscanned(config, params)
    return config, np.asarray(model.forward(config, params, TOKENS))[..., : config.vocab_size]


def _unscanned(config, params):
    """Re-key stacked layer parameters as layer_0, layer_1, ... for scan_layers=False."""
    import jax

    layers = params.pop("layers")
    for i in range(config.n_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda a: a[i], layers)
    return config, params


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gpt2_logits_match_transformers(tmp_path, scan_layers):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=64, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    config, ours = _our_logits(tmp_path, hf_model, scan_layers=scan_layers)
    assert config.tie_embeddings and config.positions == "learned"
    np.testing.assert_allclose(ours, _reference_logits(hf_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "n_kv_heads, tie, rope_theta",
    [(2, False, 10_000.0), (1, True, 500_000.0), (4, False, 1234.5)],
    ids=["gqa-untied", "mqa-tied-theta5e5", "mha-theta1234"],
)
def test_llama_logits_match_transformers(tmp_path, n_kv_heads, tie, rope_theta):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_theta=rope_theta,
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    # Random init leaves norm scales at 1; perturb them so the test sees their mapping.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    config, ours = _our_logits(tmp_path, hf_model)
    assert (config.n_kv_heads, config.tie_embeddings, config.rope_theta) == (n_kv_heads, tie, rope_theta)
    np.testing.assert_allclose(ours, _reference_logits(hf_model), atol=1e-4, rtol=0)


def test_unsupported_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'bert'"):
        model.from_hf(tmp_path)


def _saved_llama(tmp_path, **overrides):
    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides,
    )
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    return tmp_path


def _saved_gpt2(tmp_path, **overrides):
    hf_config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=3, n_head=4, **overrides)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory, **fields):
    config_file = directory / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))


@pytest.mark.parametrize(
    "save, overrides, message",
    [
        (_saved_llama, dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported \(supported: 'silu'\)"),
        (_saved_llama, dict(attention_bias=True), r"attention_bias=True is not supported"),
        (_saved_llama, dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_type 'linear' is not supported"),
        (_saved_gpt2, dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx=True is not supported"),
        (_saved_gpt2, dict(activation_function="relu"), r"activation_function='relu' is not supported"),
    ],
)
def test_config_fields_that_change_the_function_are_refused_by_name(tmp_path, save, overrides, message):
    with pytest.raises(ValueError, match=message):
        model.from_hf(save(tmp_path, **overrides))


def test_weights_of_more_layers_than_the_config_are_refused(tmp_path):
    _edit_config(_saved_gpt2(tmp_path), n_layer=2)
    with pytest.raises(ValueError, match=r"tensors the config does not use: transformer\.h\.2\.attn\.c_attn\.bias, .* and 4 more$"):
        model.from_hf(tmp_path)


def test_a_changed_width_names_the_tensor_and_both_shapes(tmp_path):
    _edit_config(_saved_llama(tmp_path), hidden_size=96)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.input_layernorm.weight' has shape \(64,\); the config implies \(96,\)"):
        model.from_hf(tmp_path)


def test_a_vocabulary_size_mismatch_is_refused_at_load(tmp_path):
    _edit_config(_saved_llama(tmp_path), vocab_size=100)
    with pytest.raises(ValueError, match=r"tensor 'model.embed_tokens.weight' has shape \(96, 64\); the config implies \(100, 64\)"):
        model.from_hf(tmp_path)


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _saved_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' \(shape \(160, 64\)\) is missing"):
        model.from_hf(tmp_path)


def test_gpt2_with_an_untied_head_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    config, ours = _our_logits(tmp_path, hf_model)
    assert not config.tie_embeddings
    np.testing.assert_allclose(ours, _reference_logits(hf_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "family, tie",
    [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)],
)
def test_export_loads_in_transformers_with_the_same_logits_and_reimports_identically(tmp_path, family, tie):
    import jax

    from model.export import to_hf

    torch.manual_seed(0)
    if family == "gpt2":
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tie,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ))
    else:
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        ))
    hf_model.save_pretrained(tmp_path / "original")
    config, params = model.from_hf(tmp_path / "original")
    # 96 ids are stored as 128 rows, zero beyond 96; export writes the 96.
    tables = ("embedding",) if tie else ("embedding", "head")
    for name in tables:
        assert params[name].shape == (128, 64)
        np.testing.assert_array_equal(params[name][96:], 0.0)
    assert set(params) & {"embedding", "head"} == set(tables)
    to_hf(config, params, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ours = np.asarray(model.forward(config, params, TOKENS))[..., :96]
    np.testing.assert_allclose(_reference_logits(exported), ours, atol=1e-4, rtol=0)
    config_again, params_again = model.from_hf(tmp_path / "exported")
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_the_exported_tokenizer_encodes_and_decodes_as_ours(tmp_path, model_type):
    import email
    import pathlib

    import ml_collections

    from data import tokenizer as tokenizer_lib
    from model.export import hf_tokenizer

    corpus = [pathlib.Path(m.__file__).read_text()[:20_000] for m in (json, email, pathlib, pytest)]
    corpus.append("Ünïcödé café — “quotes” 日本語のテキスト。 emoji 😀 tab\there  two  spaces\n\nnewlines")
    settings = ml_collections.ConfigDict(dict(model_type=model_type, vocab_size=600, character_coverage=0.9995, split_digits=False))
    ours = tokenizer_lib.train(tokenizer_lib.training_pieces(corpus), settings)
    hf_tokenizer(ours.model_proto).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True, "clean_up_tokenization_spaces": False,
    }))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [
        "hello world", " leading space", "  two", "trailing ", "a   b", "\nfirst", "a\nb\n\nc", "\tx\t", "ünïcödé",
        "日本語", "😀🎉", "rare \u0b85\u0bae", "\r\n crlf", "zero\u200bwidth", "nbsp\u00a0x", "", " ", "def f(x):\n    return x\n",
        # SentencePiece's own symbol for a space, as a character of the text: its bytes.
        "\u2581", "a\u2581b", " \u2581 ", "\u2581\u2581x",
        # The special pieces' names are text.
        "<s> not bos", "</s>", "<unk>", "<pad>", "<0x41>",
    ] + [text[:2000] for text in corpus]
    for text in texts:
        ids = ours.encode([text], add_bos=True)[0]
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == text, text
