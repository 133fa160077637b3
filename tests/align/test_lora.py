"""LoRA adapters: identity at init, the merge against numpy, gradients, targets, shardings."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import model
from align import lora
from model import sharding

LLAMA = model.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16
)
GPT2 = model.get_config(
    "gpt2-124m", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, max_seq_len=16
)
CONFIGS = {
    "llama_scan": LLAMA,
    "llama_unrolled": LLAMA.replace(scan_layers=False),
    "gpt2_scan": GPT2,
    "gpt2_unrolled": GPT2.replace(scan_layers=False),
}
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
RANK, ALPHA = 4, 8.0


@functools.cache
def _setup(name):
    """Base parameters and fresh adapters on every dense kernel. The parameters are normal
    with std 0.2, so attention is far from uniform and every kernel gets a sizable gradient
    (numpy draws them: cheaper than compiling the model's init)."""
    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(model.abstract_params(config))
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), abstract)
    adapters = lora.init_adapters(config, jax.random.key(1), rank=RANK, targets=lora.DENSE_TARGETS)
    return config, params, nn.meta.unbox(adapters)


def _randomize_b(adapters, seed=2):
    """Nonzero B everywhere, so the adapters change the model."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = [
        0.1 * jax.random.normal(k, x.shape) if path[-1].key == "b" else x for (path, x), k in zip(flat, keys)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _flat(tree):
    return dict(lora._flatten(tree))


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_b_leaves_logits_unchanged(name):
    config, params, adapters = _setup(name)
    forward = jax.jit(functools.partial(model.forward, config))
    base = forward(params, TOKENS)
    adapted = forward(lora.apply(params, adapters, alpha=ALPHA, rank=RANK), TOKENS)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    # A is random (Kaiming-uniform, bound 1/sqrt(I)) and B zero.
    for path, adapter in _flat(adapters).items():
        if path.endswith("/a"):
            I = adapter.shape[-2]
            assert 0.5 / np.sqrt(I) < np.abs(adapter).max() <= 1 / np.sqrt(I)
        else:
            np.testing.assert_array_equal(adapter, 0.0)


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_matches_numpy(name):
    config, params, adapters = _setup(name)
    adapters = _randomize_b(adapters)
    merged = lora.apply(params, adapters, alpha=ALPHA, rank=RANK)
    flat_params, flat_merged, flat_adapters = _flat(params), _flat(merged), _flat(adapters)
    adapted = lora.target_paths(config, lora.DENSE_TARGETS)
    for path, w in flat_params.items():
        if path not in adapted:
            assert flat_merged[path] is w, path
            continue
        w = np.asarray(w, np.float64)
        a = np.asarray(flat_adapters[f"{path}/a"], np.float64)
        b = np.asarray(flat_adapters[f"{path}/b"], np.float64)
        layers = zip(w, a, b) if config.scan_layers else [(w, a, b)]
        expected = np.stack([w_l + ALPHA / RANK * (a_l @ b_l).reshape(w_l.shape) for w_l, a_l, b_l in layers])
        np.testing.assert_allclose(flat_merged[path], expected.reshape(w.shape), rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(flat_merged[path]) - w).max() > 1e-3, path


def test_merge_keeps_kernel_dtype():
    _, params, adapters = _setup("llama_scan")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    adapters = _randomize_b(adapters)
    q = lora.apply(params, adapters, alpha=ALPHA, rank=RANK)["layers"]["attn"]["q"]
    assert q.dtype == jnp.bfloat16
    a, b = (np.asarray(adapters["layers"]["attn"]["q"][k], np.float64) for k in "ab")
    expected = np.asarray(params["layers"]["attn"]["q"], np.float64) + ALPHA / RANK * (a @ b).reshape(q.shape)
    np.testing.assert_allclose(np.asarray(q, np.float64), expected, rtol=2**-8)


@pytest.mark.parametrize("name", ["llama_scan", "gpt2_unrolled"])
def test_gradients(name):
    """dL/dA = s G B^T and dL/dB = s A^T G, with G = dL/dW the gradient w.r.t. the merged
    kernel (flattened to [I, O]); so at init (B = 0) only B learns."""
    config, params, adapters = _setup(name)
    weights = jax.random.normal(jax.random.key(3), (2, 8, config.vocab_size))

    def loss_of_params(p):
        return jnp.sum(weights * model.forward(config, p, TOKENS)[..., : config.vocab_size])

    loss_of_adapters = jax.jit(
        jax.grad(lambda ad: loss_of_params(lora.apply(params, ad, alpha=ALPHA, rank=RANK)))
    )
    grads_of_params = jax.jit(jax.grad(loss_of_params))

    at_init = _flat(loss_of_adapters(adapters))
    for path, g in at_init.items():
        if path.endswith("/a"):
            np.testing.assert_array_equal(g, 0.0)
        else:
            assert np.abs(g).max() > 1e-4, path

    adapters = _randomize_b(adapters)
    grads = _flat(loss_of_adapters(adapters))
    g_w = _flat(grads_of_params(lora.apply(params, adapters, alpha=ALPHA, rank=RANK)))
    flat_adapters = _flat(adapters)
    for path in lora.target_paths(config, lora.DENSE_TARGETS):
        a = np.asarray(flat_adapters[f"{path}/a"], np.float64)
        b = np.asarray(flat_adapters[f"{path}/b"], np.float64)
        g_IO = np.asarray(g_w[path], np.float64).reshape(*a.shape[:-1], b.shape[-1])
        expected_a = ALPHA / RANK * g_IO @ np.swapaxes(b, -1, -2)
        expected_b = ALPHA / RANK * np.swapaxes(a, -1, -2) @ g_IO
        assert np.abs(grads[f"{path}/a"]).max() > 1e-4, path
        np.testing.assert_allclose(grads[f"{path}/a"], expected_a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grads[f"{path}/b"], expected_b, rtol=1e-4, atol=1e-6)


def test_targets():
    assert lora.target_paths(LLAMA, lora.ATTENTION_TARGETS) == [f"layers/attn/{n}" for n in "koqv"]
    assert lora.target_paths(LLAMA.replace(scan_layers=False), r"layer_1/mlp/down$") == ["layer_1/mlp/down"]
    assert lora.target_paths(LLAMA, lora.DENSE_TARGETS) == [
        *(f"layers/attn/{n}" for n in "koqv"), "layers/mlp/down", "layers/mlp/gate", "layers/mlp/up"
    ]
    # GPT-2 has no gate kernel.
    assert lora.target_paths(GPT2, lora.DENSE_TARGETS) == [
        *(f"layers/attn/{n}" for n in "koqv"), "layers/mlp/down", "layers/mlp/up"
    ]
    with pytest.raises(ValueError, match=re.escape("'mlp/fc$' match no parameter")):
        lora.target_paths(LLAMA, r"mlp/fc$")
    with pytest.raises(ValueError, match="is not a regular expression"):
        lora.target_paths(LLAMA, r"attn/(q")
    # Unanchored, attn/q also selects GPT-2's q_bias.
    with pytest.raises(ValueError, match=r"not dense kernels: \['layers/attn/q_bias'\]"):
        lora.init_adapters(GPT2, jax.random.key(0), rank=RANK, targets=r"attn/q")
    with pytest.raises(ValueError, match=r"not dense kernels: \['embedding'\]"):
        lora.init_adapters(LLAMA, jax.random.key(0), rank=RANK, targets=r"^embedding")
    with pytest.raises(ValueError, match="attn_norm/scale"):
        lora.init_adapters(LLAMA, jax.random.key(0), rank=RANK, targets=r"norm/scale$")


def test_rank_is_checked():
    _, params, adapters = _setup("llama_scan")
    with pytest.raises(ValueError, match="rank must be positive, got 0"):
        lora.init_adapters(LLAMA, jax.random.key(0), rank=0)
    # A wrong rank would silently change the scale alpha / rank.
    with pytest.raises(ValueError, match=f"layers/attn/k has rank {RANK}, not 8"):
        lora.apply(params, adapters, alpha=ALPHA, rank=8)


@pytest.mark.parametrize("name", ["llama_scan", "llama_unrolled"])
def test_logical_specs_and_count(name):
    config = CONFIGS[name]
    D, N, K, H, F, L = 32, 4, 2, 8, 48, 2
    boxed = jax.eval_shape(
        lambda key: lora.init_adapters(config, key, rank=RANK, targets=lora.DENSE_TARGETS), jax.random.key(0)
    )
    specs = _flat(nn.get_partition_spec(boxed))
    shapes = {path: x.shape for path, x in _flat(nn.meta.unbox(boxed)).items()}
    lead, lead_shape = (("layers",), (L,)) if config.scan_layers else ((), ())
    prefix = "layers" if config.scan_layers else "layer_0"
    expected = {
        "attn/q": (("embed", D), ("heads", N * H)),
        "attn/k": (("embed", D), ("kv_heads", K * H)),
        "attn/v": (("embed", D), ("kv_heads", K * H)),
        "attn/o": (("heads", N * H), ("embed", D)),
        "mlp/up": (("embed", D), ("mlp", F)),
        "mlp/gate": (("embed", D), ("mlp", F)),
        "mlp/down": (("mlp", F), ("embed", D)),
    }
    for kernel, ((in_name, I), (out_name, O)) in expected.items():
        path = f"{prefix}/{kernel}"
        assert specs[f"{path}/a"] == PartitionSpec(*lead, in_name, None)
        assert specs[f"{path}/b"] == PartitionSpec(*lead, None, out_name)
        assert shapes[f"{path}/a"] == (*lead_shape, I, RANK)
        assert shapes[f"{path}/b"] == (*lead_shape, RANK, O)
    per_layer = sum(RANK * (I + O) for (_, I), (_, O) in expected.values())
    assert lora.adapter_count(boxed) == L * per_layer


def test_specs_resolve_on_a_mesh():
    """A like the kernel's input side, B like its output side, on a (1, 4, 2) mesh."""
    mesh = sharding.make_mesh((1, 4, 2), model_config=LLAMA)
    boxed = jax.eval_shape(
        lambda key: lora.init_adapters(LLAMA, key, rank=RANK, targets=lora.DENSE_TARGETS), jax.random.key(0)
    )
    shardings = _flat(sharding.param_shardings(nn.get_partition_spec(boxed), mesh))
    assert shardings["layers/attn/q/a"].spec == PartitionSpec(None, "fsdp", None)
    assert shardings["layers/attn/q/b"].spec == PartitionSpec(None, None, "tensor")
    assert shardings["layers/mlp/down/a"].spec == PartitionSpec(None, "tensor", None)
    assert shardings["layers/mlp/down/b"].spec == PartitionSpec(None, None, "fsdp")
