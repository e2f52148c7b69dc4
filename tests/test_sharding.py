"""Sharded == single device, on the 8 fake CPU devices of conftest.py."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from lm_core import loss, optim
from lm_core import train_step as ts
from lm_core.errors import UserError
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, logical_to_spec, make_mesh
from tests.helpers import random_batch, tiny_config

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (2, 1, 2, 2)]


def loss_and_grads_on(mesh_shape, batch, grad_accum_steps=1):
    config = tiny_config()
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    optimizer = optim.make_optimizer(optim.OptimizerConfig())
    graphdef, state, shardings = ts.init_train_state(lambda: Transformer(config, rngs=nnx.Rngs(0)), optimizer,
                                                     mesh, seed=0)

    def compute(params, batch, rng):
        return ts.loss_and_grads(graphdef, loss.next_token_loss, params, batch, rng, grad_accum_steps)

    fn = jax.jit(compute, in_shardings=(shardings.params, ts.batch_shardings(mesh, batch), None))
    with jax.set_mesh(mesh):
        value, metrics, grads = fn(state.params, batch, state.rng)
    return float(value), metrics, jax.tree.map(np.asarray, grads), grads


@pytest.fixture(scope="module")
def single_device():
    return loss_and_grads_on((1, 1, 1, 1), random_batch(0, packed=True))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_loss_and_gradients_equal_single_device(single_device, mesh_shape):
    expected_loss, _, expected_grads, _ = single_device
    value, _, grads, sharded_grads = loss_and_grads_on(mesh_shape, random_batch(0, packed=True))
    assert abs(value - expected_loss) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, expected_grads)
    # the gradients really are distributed: the query projection is split over fsdp and/or tensor
    spec = sharded_grads["blocks"][0]["attention"]["query_proj"][...].sharding.spec
    if mesh_shape[1] * mesh_shape[2] > 1:
        assert spec != PartitionSpec() and any(s is not None for s in spec)


def test_gradient_accumulation_equals_one_big_batch(single_device):
    expected_loss, expected_metrics, expected_grads, _ = single_device
    value, metrics, grads, _ = loss_and_grads_on((2, 1, 1, 1), random_batch(0, packed=True), grad_accum_steps=2)
    assert abs(value - expected_loss) < 1e-5
    assert float(metrics["tokens"]) == float(expected_metrics["tokens"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, expected_grads)


def test_pure_fsdp_shards_every_large_parameter():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    optimizer = optim.make_optimizer(optim.OptimizerConfig())
    _, state, _ = ts.init_train_state(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)), optimizer, mesh, 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if leaf.size > 1024:
            assert not leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
            assert leaf.addressable_shards[0].data.size == leaf.size // 8
    # the optimizer moments follow their parameters
    for leaf in jax.tree.leaves(state.opt_state):
        if leaf.size > 1024:
            assert not leaf.sharding.is_fully_replicated


def test_train_step_runs_sharded_and_matches_single_device():
    batch = random_batch(1)
    losses = {}
    for shape in [(1, 1, 1, 1), (2, 2, 2, 1)]:
        mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
        optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0))
        graphdef, state, shardings = ts.init_train_state(
            lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)), optimizer, mesh, 0)
        step = ts.make_train_step(graphdef, loss.next_token_loss, optimizer, mesh, shardings)
        history = []
        for _ in range(3):
            state, metrics = step(state, batch)
            history.append(float(metrics["loss"]))
        losses[shape] = history
        assert int(state.step) == 3
    np.testing.assert_allclose(losses[(1, 1, 1, 1)], losses[(2, 2, 2, 1)], rtol=1e-5)
    assert losses[(1, 1, 1, 1)][2] < losses[(1, 1, 1, 1)][0]


@pytest.mark.parametrize(
    ("mesh", "message"),
    [(MeshConfig(data=3), "needs 3 devices but 8 are available"),
     (MeshConfig(data=-1, fsdp=3), "8 is not divisible by 3"),
     (MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
     (MeshConfig(data=0), "invalid mesh size")])
def test_mesh_errors(mesh, message):
    with pytest.raises(UserError, match=message):
        make_mesh(mesh)


def test_indivisible_parameter_is_a_clear_error():
    mesh = make_mesh(MeshConfig(data=1, tensor=8))
    optimizer = optim.make_optimizer(optim.OptimizerConfig())
    with pytest.raises(UserError, match="kv_heads|key_proj"):
        ts.init_train_state(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)), optimizer, mesh, 0)


def test_logical_rules():
    assert logical_to_spec(("batch", "act_seq", "act_embed")) == PartitionSpec(("data", "fsdp", "expert"), None,
                                                                                None)
    assert logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    # a mesh axis is used once per array; missing mesh axes are dropped
    assert logical_to_spec(("heads", "mlp"), ("data", "tensor")) == PartitionSpec("tensor", None)
    with pytest.raises(UserError, match="global batch size 6"):
        ts.check_batch_fits(make_mesh(MeshConfig(data=4, fsdp=2)), 6)
