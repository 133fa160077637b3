"""Every attention implementation equals the dense XLA reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention

B, T, N, H = 2, 200, 4, 32
# Row 0: left padding, then 3 documents; row 1: 3 documents, then right padding. T = 200 is
# no multiple of any block size used here, so every implementation pads internally.
SEGMENTS = np.array([
    [0] * 13 + [1] * 70 + [2] * 50 + [3] * 67,
    [1] * 40 + [2] * 90 + [3] * 41 + [0] * 29,
])
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
# Name -> (implementation, arguments). Blockwise's (56, 112) pads T to 224 and takes key tiles
# twice the query tiles; (25, 100) divides T, with key tiles of four query tiles; (256, 512)
# holds the whole sequence in one query tile.
KERNELS = {
    "blockwise": ("blockwise", dict(block_sizes=(64, 64))),
    "blockwise-56x112": ("blockwise", dict(block_sizes=(56, 112))),
    "blockwise-25x100": ("blockwise", dict(block_sizes=(25, 100))),
    "blockwise-one-tile": ("blockwise", dict(block_sizes=(256, 512))),
    "pallas_gpu": ("pallas_gpu", dict(block_sizes=(64, 64), interpret=True)),
    "splash_tpu": ("splash_tpu", dict(interpret=True)),
}


def _inputs(K, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(2, B, T, K, H))
    weights = rng.normal(size=(B, T, N, H))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v, weights)]


def _value_and_grads(implementation, q, k, v, segment_ids, weights, **kwargs):
    """Outputs and d/d(q, k, v) of sum(out * weights) over non-padding rows."""
    real = jnp.ones((B, T), bool) if segment_ids is None else segment_ids > 0

    def loss(q, k, v):
        out = attention.attend(q, k, v, segment_ids, implementation=implementation, **kwargs)
        return jnp.sum(jnp.where(real[:, :, None, None], out * weights, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    as_f32 = lambda x: np.asarray(x.astype(jnp.float32))
    return as_f32(out)[np.asarray(real)], [as_f32(g) for g in grads]


# (heads, packed) cases every kernel is checked on.
CASES = [("mha", True), ("gqa", True), ("mqa", True), ("gqa", False)]


def _assert_equals_xla(heads, packed, implementation, device=None, **kwargs):
    """`implementation` against xla on the same inputs (on `device`: the default one)."""
    q, k, v, weights = jax.device_put(_inputs(HEADS[heads]), device)
    segment_ids = jax.device_put(jnp.asarray(SEGMENTS, jnp.int32), device) if packed else None
    want_out, want_grads = _value_and_grads("xla", q, k, v, segment_ids, weights)
    out, grads = _value_and_grads(implementation, q, k, v, segment_ids, weights, **kwargs)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("heads, packed", CASES)
def test_equals_xla_reference(kernel, heads, packed):
    implementation, kwargs = KERNELS[kernel]
    _assert_equals_xla(heads, packed, implementation, **kwargs)


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


@pytest.mark.skipif(
    _gpu() is None, reason="compiles the Triton kernel: JAX_PLATFORMS=cuda,cpu pytest tests/model/test_attention.py -k compiled"
)
@pytest.mark.parametrize("heads, packed", CASES)
def test_pallas_gpu_compiled_for_the_gpu_equals_xla_reference(heads, packed):
    """The kernel as it runs in training: compiled, with its default tiles (on an H200, with
    backward tiles of 32, outputs within 7e-7 and gradients within 3e-6)."""
    with jax.default_matmul_precision("highest"):
        _assert_equals_xla(heads, packed, "pallas_gpu", device=_gpu(), interpret=False)


@pytest.mark.skipif(
    _gpu() is None, reason="runs cuDNN: JAX_PLATFORMS=cuda,cpu pytest tests/model/test_attention.py -k compiled"
)
@pytest.mark.parametrize("heads, packed", CASES)
def test_cudnn_gpu_compiled_for_the_gpu_equals_xla_reference(heads, packed):
    """cuDNN takes bfloat16: the reference runs in float32 on the same bfloat16-rounded inputs,
    and the errors are measured against the largest value, at bfloat16's resolution."""
    q, k, v, weights = jax.device_put(_inputs(HEADS[heads]), _gpu())
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    segment_ids = jax.device_put(jnp.asarray(SEGMENTS, jnp.int32), _gpu()) if packed else None
    with jax.default_matmul_precision("highest"):
        want_out, want_grads = _value_and_grads(
            "xla", *(x.astype(jnp.float32) for x in (q, k, v)), segment_ids, weights
        )
    out, grads = _value_and_grads("cudnn_gpu", q, k, v, segment_ids, weights)
    np.testing.assert_allclose(out, want_out, atol=2e-2 * np.abs(want_out).max(), rtol=0)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0, err_msg=f"d{name}")


def test_segment_runs_hold_exactly_the_visible_pairs():
    """cuDNN's packed layout, read back as a mask (key j visible to query i iff both lie in
    one run and j <= i), is the reference's causal segment mask; unused slots are -1."""
    segment_ids = jnp.asarray(SEGMENTS, jnp.int32)
    lengths, starts = (np.asarray(x) for x in attention.segment_runs(segment_ids, T))
    assert lengths.shape == (B, T) and starts.shape == (B, T + 1)
    np.testing.assert_array_equal(lengths[:, :5], [[13, 70, 50, 67, -1], [40, 90, 41, 29, -1]])
    np.testing.assert_array_equal(starts[:, :5], [[0, 13, 83, 133, -1], [0, 40, 130, 171, -1]])
    assert (lengths[:, 4:] == -1).all() and (starts[:, 4:] == -1).all()
    run_of = np.full((B, T), -1)
    for b in range(B):
        for r, (start, length) in enumerate(zip(starts[b], lengths[b])):
            if length > 0:
                run_of[b, start:start + length] = r
    assert (run_of >= 0).all()
    same_run = run_of[:, :, None] == run_of[:, None, :]
    visible = same_run & np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(visible, np.asarray(attention.causal_segment_mask(segment_ids, T))[:, 0])
    one_token_runs = attention.segment_runs(jnp.arange(1, 9, dtype=jnp.int32)[None], 8)
    np.testing.assert_array_equal(one_token_runs[0], [[1] * 8])
    np.testing.assert_array_equal(one_token_runs[1], [list(range(8)) + [-1]])


@pytest.mark.parametrize("T, blocks, want", [
    (2048, (256, 512), (256, 512, 2048)),
    (200, (56, 112), (56, 112, 224)),  # the test above: padded, key tiles of two query tiles
    (200, (25, 100), (25, 100, 200)),  # the test above: key tiles of four query tiles
    (600, (256, 512), (256, 256, 768)),  # 3 query tiles: 512 would not divide the length
    (128, (256, 512), (128, 128, 128)),  # one tile
    (300, (64, 32), (64, 64, 320)),  # key tiles are never smaller than query tiles
])
def test_blockwise_tiles(T, blocks, want):
    assert attention.blockwise_tiles(T, *blocks) == want


def test_segments_are_isolated():
    """Changing one document's keys and values leaves the other documents' outputs alone."""
    q, k, v, _ = _inputs(2)
    segment_ids = jnp.asarray(SEGMENTS, jnp.int32)
    in_doc2 = (segment_ids == 2)[:, :, None, None]
    k2, v2 = jnp.where(in_doc2, k + 1.0, k), jnp.where(in_doc2, v - 1.0, v)
    run = lambda k, v: attention.attend(q, k, v, segment_ids, implementation="blockwise", block_sizes=(64, 64))
    others = np.asarray((segment_ids != 2) & (segment_ids > 0))
    np.testing.assert_array_equal(np.asarray(run(k, v))[others], np.asarray(run(k2, v2))[others])


def test_blockwise_training_memory_is_below_xla():
    """Compiled temporaries of value_and_grad at T=2048: O(T * block) against O(T^2)."""
    shape = jax.ShapeDtypeStruct((1, 2048, 4, 64), jnp.float32)
    segment_ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

    def temp_bytes(implementation):
        def loss(q, k, v, segment_ids):
            return jnp.sum(attention.attend(q, k, v, segment_ids, implementation=implementation))

        grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        compiled = grad_fn.lower(shape, shape, shape, segment_ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    xla, blockwise = temp_bytes("xla"), temp_bytes("blockwise")
    assert xla > 4 * 2048 * 2048 * 4  # at least the float32 [N, T, T] scores
    assert blockwise < xla / 8, (blockwise, xla)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_float16_runs_on_the_cpu_as_float32_on_the_same_inputs_does(implementation):
    q, k, v, weights = _inputs(K=2)
    segment_ids = jnp.asarray(np.repeat([[1] * 9 + [2] * (T - 9)], B, axis=0), jnp.int32)
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    out, grads = _value_and_grads(implementation, q, k, v, segment_ids, weights.astype(jnp.float16))
    want, want_grads = _value_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)), segment_ids, weights)
    for got, ref in zip([out, *grads], [want, *want_grads]):
        np.testing.assert_allclose(got, ref, atol=2e-2 * np.abs(ref).max())


def test_resolve_and_unknown_names():
    assert attention.resolve("blockwise", 16) == "blockwise"
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto", attention.CPU_BLOCKWISE_MIN_LEN - 1) == "xla"
    assert attention.resolve("auto", attention.CPU_BLOCKWISE_MIN_LEN) == "blockwise"
    assert set(attention.IMPLEMENTATIONS) == {"auto", "xla", "blockwise", "pallas_gpu", "cudnn_gpu", "splash_tpu"}
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="model.attention"):
        attention.attend(q, q, q, None, implementation="flash")
    with pytest.raises(ValueError, match="model.attention"):
        attention.resolve("cudnn", 8)
    with pytest.raises(ValueError, match="cudnn_gpu' takes bfloat16 or float16"):
        attention.attend(q, q, q, None, implementation="cudnn_gpu")


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash_tpu"])
def test_kernels_run_per_shard_in_the_model_under_a_mesh(implementation):
    """On a data x fsdp x tensor mesh the kernels see their shard of batch and heads."""
    import model
    from model import sharding

    config = model.get_config(
        "llama-tiny", vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
    )
    mesh = sharding.make_mesh((2, 2, 2), model_config=config)
    params = model.init_params(config, jax.random.key(0), mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 48)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 28], 8, axis=0), jnp.int32)
    forward = lambda name: jax.jit(
        lambda p, t, s: model.forward(config.replace(attention=name), p, t, segment_ids=s)
    )
    with jax.set_mesh(mesh):
        reference = forward("xla")(params, tokens, segment_ids)
        out = forward(implementation)(params, tokens, segment_ids)
    np.testing.assert_allclose(out, reference, atol=2e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_cudnn_gpu_lowers_for_cuda_to_fused_attention_calls(monkeypatch, packed):
    """Lowered for CUDA on the CPU: forward and backward are cuDNN's fused attention calls, and
    packed rows pass the sequence lengths and offsets (7 forward operands) where plain causal
    attention passes q, k, v alone. The GPU test checks the values."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)  # no cuDNN on the CPU
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    kv = jnp.zeros((B, T, HEADS["gqa"], H), jnp.bfloat16)
    segment_ids = jnp.asarray(SEGMENTS, jnp.int32) if packed else None

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, segment_ids, implementation="cudnn_gpu").astype(jnp.float32))

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",))
    calls = [line for line in lowered.as_text().splitlines() if "stablehlo.custom_call @__cudnn$fmha" in line]
    targets = [line.split("@")[1].split("(")[0] for line in calls]
    assert targets == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], targets
    forward_operands = calls[0].split("(", 1)[1].split(")")[0].split(", ")
    assert len(forward_operands) == (7 if packed else 3), forward_operands
