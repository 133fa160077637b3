"""Logical-axis rules, the mesh, and sharded-vs-unsharded forward on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import model
from model import sharding

CONFIG = model.ModelConfig(
    vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=96, max_seq_len=32,
)


def test_resolution_is_first_match_wins_and_uses_each_mesh_axis_once():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", "tensor"))
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", None)
    # `batch` takes fsdp first; `embed` must then fall through to its next rule.
    assert sharding.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), "tensor")
    # Table order decides: with `embed` first, `batch` finds fsdp taken and stays unsharded.
    assert sharding.logical_to_spec(("batch", "embed"), rules[1:] + rules[:1]) == P(None, "fsdp")
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)


def test_every_parameter_gets_a_sharding_from_the_table():
    mesh = sharding.make_mesh((1, 2, 4))
    shardings = sharding.param_shardings(model.param_specs(CONFIG), mesh)
    assert shardings["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")
    assert shardings["embedding"].spec == P("tensor", "fsdp")
    assert shardings["head"].spec == P("tensor", "fsdp")
    # Changing the table changes the layout, not the model code.
    with sharding.axis_rules((("embed", "tensor"), ("heads", "fsdp"))):
        assert sharding.param_shardings(model.param_specs(CONFIG), mesh)["layers"]["attn"]["q"].spec == (
            P(None, "tensor", "fsdp", None)
        )


@pytest.mark.parametrize(
    "mesh_shape, n_kv_heads, vocab_size",
    # 1001 ids are stored as 1024 rows, which the 8-way tensor axis divides.
    [((8, 1, 1), 2, 128), ((2, 2, 2), 2, 128), ((1, 2, 4), 4, 128), ((1, 1, 8), 8, 1001)],
)
def test_sharded_forward_equals_single_device_forward(mesh_shape, n_kv_heads, vocab_size):
    config = CONFIG.replace(n_kv_heads=n_kv_heads, vocab_size=vocab_size)
    mesh = sharding.make_mesh(mesh_shape, model_config=config)
    params = model.init_params(config, jax.random.key(0), mesh=mesh)
    q = params["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape[2] == config.n_heads // mesh_shape[2]

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(8, 16)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 9 + [2] * 7], 8, axis=0), jnp.int32)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))
    with jax.set_mesh(mesh):
        sharded = jax.jit(model.forward, static_argnums=0)(
            config, params, jax.device_put(tokens, batch_sharding),
            segment_ids=jax.device_put(segment_ids, batch_sharding),
        )
    expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert sharded.sharding.is_equivalent_to(expected, sharded.ndim)

    local = jax.device_get(params)
    reference = model.forward(config, local, tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(sharded, reference, atol=1e-5, rtol=0)


def test_make_mesh_fills_the_rest_and_refuses_bad_shapes():
    assert sharding.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices, but there are 8"):
        sharding.make_mesh((2, 2, 3))
    with pytest.raises(ValueError, match="not divisible by the fixed axes"):
        sharding.make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh((-1, -1, 2))
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="model.n_kv_heads=2 is not divisible by the 'tensor' mesh axis of size 4"):
        sharding.make_mesh((1, 2, 4), model_config=CONFIG)
    with pytest.raises(ValueError, match=r"model.n_kv_heads=2 is not divisible by the 'tensor' mesh axis of size 16"):
        sharding.make_mesh((1, 1, 16), devices=jax.devices() * 2, model_config=CONFIG)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_the_sharded_gradient_needs_no_array_copied_whole_to_every_device(positions, capfd):
    """XLA's partitioner warns when it finds no way to a sharding short of copying a whole
    array to every device; the embedding lookups, with the table sharded over the model
    width, made it do so."""
    config = CONFIG.replace(positions=positions)
    mesh = sharding.make_mesh((2, 2, 2), model_config=config)
    params = model.init_params(config, jax.random.key(0), mesh=mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(8, 32)), jnp.int32)
    loss = lambda params, tokens: jnp.mean(model.forward(config, params, tokens) ** 2)
    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"))))
        jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_two_processes_join_one_job_from_the_environment_variables_the_docs_name_once():
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    program = (
        "from model import sharding; sharding.initialize_distributed(); sharding.initialize_distributed(); "
        "import jax; print(jax.process_index(), jax.process_count())"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    processes = [
        subprocess.Popen([sys.executable, "-c", program], env={**env, "JAX_PROCESS_ID": str(i)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [out.split() for out, _ in outputs] == [["0", "2"], ["1", "2"]], outputs
