"""Logits parity with Hugging Face `transformers` models built from small random configs."""

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
    return config, np.asarray(model.forward(config, params, TOKENS))


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
