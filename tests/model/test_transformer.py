"""Forward pass semantics: KV cache, packed sequences, remat, counts and FLOPs."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model

LLAMA = model.ModelConfig(
    vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
)
GPT2 = model.ModelConfig(
    vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, max_seq_len=64,
    norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True, use_bias=True,
)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2, "llama-unscanned": LLAMA.replace(scan_layers=False)}


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 128, size=shape), jnp.int32)


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_equals_full_forward(name):
    config = CONFIGS[name]
    params = model.init_params(config, jax.random.key(1))
    tokens = _tokens((2, 12))
    full = model.forward(config, params, tokens)

    cache = model.init_cache(config, batch_size=2, max_len=16)
    logits, cache = jax.jit(model.prefill, static_argnums=0)(config, params, tokens[:, :5], cache)
    steps = [logits]
    step = jax.jit(model.decode_step, static_argnums=0)
    for t in range(5, 12):
        logits, cache = step(config, params, tokens[:, t], cache)
        steps.append(logits[:, None])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)
    assert int(cache["index"]) == 12


def test_left_padded_prompts_decode_like_unpadded_rows():
    config = LLAMA
    params = model.init_params(config, jax.random.key(2))
    short, long = _tokens((1, 4), seed=3), _tokens((1, 7), seed=4)
    pad = 3
    prompts = jnp.concatenate([jnp.pad(short, ((0, 0), (pad, 0))), long])
    segment_ids = jnp.asarray([[0] * pad + [1] * 4, [1] * 7], jnp.int32)
    positions = jnp.asarray([[0] * pad + list(range(4)), list(range(7))], jnp.int32)
    cache = model.init_cache(config, batch_size=2, max_len=10)
    logits, cache = model.prefill(config, params, prompts, cache, segment_ids=segment_ids, positions=positions)
    next_tokens = _tokens((2,), seed=5)
    step_logits, _ = model.decode_step(config, params, next_tokens, cache, positions=jnp.asarray([4, 7]))

    for row, alone in enumerate([short, long]):
        sequence = jnp.concatenate([alone, next_tokens[row, None, None]], axis=1)
        reference = model.forward(config, params, sequence)[0]
        n = alone.shape[1]
        np.testing.assert_allclose(logits[row, -n:], reference[:n], atol=2e-5, rtol=0)
        np.testing.assert_allclose(step_logits[row], reference[n], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_segments_equal_documents_run_alone(name):
    config = CONFIGS[name]
    params = model.init_params(config, jax.random.key(3))
    docs = [_tokens((1, 5), seed=6), _tokens((1, 7), seed=7), _tokens((1, 2), seed=8)]
    packed = jnp.concatenate(docs + [jnp.zeros((1, 2), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2], jnp.int32)
    logits = model.forward(config, params, packed, segment_ids=segment_ids)
    explicit_positions = jnp.asarray([list(range(5)) + list(range(7)) + [0, 1] + [0, 1]])
    logits_explicit = model.forward(
        config, params, packed, segment_ids=segment_ids, positions=explicit_positions
    )
    np.testing.assert_array_equal(logits, logits_explicit)
    start = 0
    for doc in docs:
        alone = model.forward(config, params, doc)
        n = doc.shape[1]
        np.testing.assert_allclose(logits[:, start : start + n], alone, atol=2e-5, rtol=0)
        start += n


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hidden_states_through_the_head_give_the_logits(name):
    config = CONFIGS[name]
    params = model.init_params(config, jax.random.key(4))
    tokens = _tokens((2, 9), seed=9)
    segment_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2], jnp.int32)
    hidden = model.hidden_states(config, params, tokens, segment_ids=segment_ids)
    assert hidden.shape == (2, 9, config.d_model)
    head = np.asarray(model.head_weights(config, params), np.float64)
    expected = np.asarray(hidden, np.float64) @ head.T
    logits = model.forward(config, params, tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(model.output_logits(config, model.head_weights(config, params), hidden), logits)


def test_remat_policies_and_layer_scan_give_the_same_gradients():
    tokens = _tokens((2, 8))

    def grads(config):
        params = model.init_params(config.replace(remat="none"), jax.random.key(4))
        loss = lambda p: jnp.mean(model.forward(config, p, tokens) ** 2)
        return jax.grad(loss)(params)

    reference = grads(LLAMA)
    for remat in ("full", "dots"):
        chex_tree = grads(LLAMA.replace(remat=remat))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), chex_tree, reference)


def test_remat_lowers_the_compiled_gradients_memory():
    """Remat keeps the layer loop rolled. Unrolled, it saves next to nothing: here 13.1 MB
    of temporaries with full remat and 13.8 MB with dots, against 13.9 MB without remat,
    where rolled they are 4.4 and 6.9 MB."""
    tokens = _tokens((8, 64))

    def temporaries(config):
        params = model.init_params(config.replace(remat="none"), jax.random.key(4))
        loss = lambda p: jnp.mean(model.forward(config, p, tokens) ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    config = LLAMA.replace(n_layers=4)
    none = temporaries(config)
    assert temporaries(config.replace(remat="full")) < 0.4 * none
    assert temporaries(config.replace(remat="dots")) < 0.6 * none


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("llama-tiny", {}), ("gpt2-124m", {}), ("gpt2-350m", {}), ("llama-small", {}), ("llama-1b", {}),
        ("llama-tiny", {"use_bias": True}),  # SwiGLU with biases: up and down, no gate bias
    ],
)
def test_param_counts_match_the_parameter_tree(preset, overrides):
    config = model.get_config(preset).replace(**overrides)
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    total = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    embeddings = sum(
        np.prod(shapes[k].shape) for k in ("embedding", "position_embedding", "head") if k in shapes
    )
    counts = model.param_counts(config)
    assert counts["total"] == total
    assert counts["nonembedding"] == total - embeddings


def test_gpt2_124m_has_the_published_parameter_count():
    # 124,439,808 with GPT-2's 50257-token vocabulary and tied embeddings; the embedding is
    # stored with 50,304 rows (as nanoGPT pads it), 47 x 768 more.
    config = model.get_config("gpt2-124m")
    assert config.padded_vocab_size == 50_304
    assert model.param_counts(config)["total"] == 124_439_808 + 47 * 768


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_vocabulary_is_stored_padded_to_a_multiple_of_128_and_its_padding_masked(name):
    """1000 ids: 1024 rows, zero beyond 1000 at init; the padded ids' logits are
    PADDING_LOGIT, and stay near it when their rows would win every softmax unmasked; the
    real ones do not change."""
    config = CONFIGS[name].replace(vocab_size=1000)
    params = model.init_params(config, jax.random.key(0))
    tables = ("embedding",) if config.tie_embeddings else ("embedding", "head")
    for table in tables:
        assert params[table].shape == (1024, config.d_model)
        np.testing.assert_array_equal(params[table][1000:], 0.0)
        assert np.all(np.abs(np.asarray(params[table][:1000])).sum(-1) > 0)
    loud = jax.random.normal(jax.random.key(1), (24, config.d_model)) * 10.0  # logits ~ +-80
    adversarial = {**params, **{t: params[t].at[1000:].set(loud) for t in tables}}
    tokens = _tokens((2, 9))
    plain = np.asarray(model.forward(config, params, tokens))
    np.testing.assert_array_equal(plain[..., 1000:], model.transformer.PADDING_LOGIT)
    logits = np.asarray(model.forward(config, adversarial, tokens))
    assert logits.shape == (2, 9, 1024)
    np.testing.assert_allclose(logits[..., 1000:], model.transformer.PADDING_LOGIT, rtol=1e-6)
    np.testing.assert_allclose(logits[..., :1000], plain[..., :1000], atol=1e-6, rtol=0)
    # A softmax over all 1024 is one over the 1000 real ids; p log p, the entropy, stays finite.
    logp = jax.nn.log_softmax(jnp.asarray(logits) / 0.7, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    real = logits[..., :1000].astype(np.float64) / 0.7
    real_logp = real - real.max(-1, keepdims=True)
    real_logp -= np.log(np.exp(real_logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(logp[..., :1000], real_logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropy, -(np.exp(real_logp) * real_logp).sum(-1), rtol=1e-5)
    # Counts store the 1024 rows; FLOPs count the 1000 real ids.
    padded = config.replace(vocab_size=1024)
    assert model.param_counts(config) == model.param_counts(padded)
    flops, flops_padded = model.flops_per_token(config, 64)["total"], model.flops_per_token(padded, 64)["total"]
    assert flops_padded - flops == 6 * 24 * config.d_model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_flops_per_token_is_three_times_the_compiled_forward(name):
    """XLA's own FLOP count of the forward pass is an independent check of 6N + 12 L d T
    (training = 3x forward); elementwise work makes XLA's count a little larger."""
    # Unscanned: XLA counts a while-loop body once, not once per layer.
    config = CONFIGS[name].replace(
        d_model=256, n_heads=4, n_kv_heads=4, d_ff=1024, vocab_size=512, scan_layers=False
    )
    seq_len, batch = 64, 2
    params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    compiled = jax.jit(model.forward, static_argnums=0).lower(config, params, tokens).compile()
    xla_forward_flops = compiled.cost_analysis()["flops"] / (batch * seq_len)
    predicted = model.flops_per_token(config, seq_len)["total"] / 3
    assert predicted <= xla_forward_flops <= 1.05 * predicted


@pytest.mark.parametrize("target", [3e7, 1.5e8, 1e9])
def test_shape_for_params_hits_the_target(target):
    config = model.shape_for_params(target)
    assert abs(model.param_counts(config)["total"] / target - 1) < 0.15
    assert 32 <= config.d_model / config.n_layers <= 128
    assert config.n_heads % config.n_kv_heads == 0


@pytest.mark.parametrize("target, vocab_size", [(1e4, 32768), (1e12, 32768)])
def test_shape_for_params_refuses_a_target_no_shape_comes_near(target, vocab_size):
    # 1e4: the embedding alone holds more; 1e12: beyond 96 layers of 128 heads.
    with pytest.raises(ValueError, match=r"no shape with these settings comes within 15%"):
        model.shape_for_params(target, vocab_size=vocab_size)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="model.norm"):
        LLAMA.replace(norm="batchnorm")
    with pytest.raises(ValueError, match="model.n_heads=4 is not a multiple of model.n_kv_heads=3"):
        LLAMA.replace(n_kv_heads=3)


def test_bfloat16_head_gradients_equal_autodiff_and_are_bfloat16_matmuls():
    from model.transformer import _head_matmul, _head_matmul_narrow_gradient

    rng = np.random.default_rng(0)
    x, head, weights = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(12, 16), (40, 16), (12, 40)])
    loss = lambda matmul, x, head: jnp.sum(matmul(x, head) * weights)
    want = jax.grad(functools.partial(loss, _head_matmul), (0, 1))(x, head)
    # On float32 operands the cast is the identity: the hand-written backward pass is autodiff's.
    got = jax.grad(functools.partial(loss, _head_matmul_narrow_gradient), (0, 1))(x, head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # In bfloat16 it differs from the float32 gradient by the rounding of the logit gradient.
    x16, head16 = x.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    want = jax.grad(functools.partial(loss, _head_matmul), (0, 1))(x16.astype(jnp.float32), head16.astype(jnp.float32))
    got = jax.grad(functools.partial(loss, _head_matmul_narrow_gradient), (0, 1))(x16, head16)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2 * np.abs(w).max())

    # Through the model every matmul touching the vocabulary, forward and backward, takes
    # bfloat16 operands; autodiff alone multiplies the float32 logit gradient in float32.
    config = LLAMA.replace(vocab_size=200, dtype="bfloat16")  # stored padded to 256, a size no other array has
    params = model.init_params(config, jax.random.key(4))
    grad = jax.jit(jax.grad(lambda p: jnp.mean(model.forward(config, p, _tokens((2, 8))) ** 2)))
    assert_vocabulary_matmuls_take_bfloat16(grad.lower(params).as_text(), config.padded_vocab_size)


def assert_vocabulary_matmuls_take_bfloat16(lowered_text: str, padded_vocab_size: int):
    """The lowered gradient has the head's three matmuls (forward and two backward), found
    by the vocabulary size, and each takes two bfloat16 operands."""
    vocab_dots = [line for line in lowered_text.splitlines() if "dot_general" in line and f"{padded_vocab_size}x" in line]
    assert len(vocab_dots) == 3, vocab_dots
    for line in vocab_dots:
        operands = line.split(" : (")[1].split(") -> ")[0]
        assert operands.count("bf16>") == 2, line


def _dots(compiled_text: str):
    """(operand types, contracting dims) of every dot in XLA's compiled HLO text."""
    dots = []
    for block in compiled_text.split("\n\n"):
        defined = dict(re.findall(r"(%[\w.\-]+) = (\S+) ", block))
        for lhs, rhs, contracting in re.findall(r" dot\((%[\w.\-]+), (%[\w.\-]+)\), (lhs_contracting_dims=\S+ rhs_contracting_dims=\{\d*\})", block):
            dots.append((defined[lhs], defined[rhs], contracting))
    return dots


def test_bfloat16_projections_on_the_cpu_are_row_major_bfloat16_matmuls_with_autodiffs_gradients():
    from model.transformer import project

    rng = np.random.default_rng(0)
    x, w, bias = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in [(2, 8, 16), (16, 4, 8), (4, 8)])
    weights = jnp.asarray(rng.normal(size=(2, 8, 4, 8)), jnp.float32)
    loss = lambda x, w, bias: jnp.sum(project(x, w, bias).astype(jnp.float32) * weights)
    # The float32 reference: the same bfloat16 values, autodiff's einsum.
    reference = lambda x, w, bias: jnp.sum((jnp.einsum("bti,ino->btno", x, w) + bias) * weights)
    want = jax.grad(reference, (0, 1, 2))(*(a.astype(jnp.float32) for a in (x, w, bias)))
    got = jax.grad(loss, (0, 1, 2))(x, w, bias)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2, atol=1e-2 * np.abs(r).max())
    np.testing.assert_allclose(
        np.asarray(project(x, w, bias), np.float32), jnp.einsum("bti,ino->btno", x.astype(jnp.float32), w.astype(jnp.float32)) + bias.astype(jnp.float32),
        rtol=1e-2, atol=1e-2,
    )
    # XLA:CPU runs a bfloat16 matmul in its fast kernel only when both operands are bfloat16
    # and row-major, contracted as [M, K] x [K, N]; otherwise it converts both to float32.
    dots = _dots(jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(x, w, bias).compile().as_text())
    assert len(dots) == 3, dots
    for lhs, rhs, contracting in dots:
        assert lhs.startswith("bf16[") and lhs.endswith("{1,0}") and rhs.startswith("bf16[") and rhs.endswith("{1,0}"), dots
        assert contracting == "lhs_contracting_dims={1}, rhs_contracting_dims={0}", dots
