"""MoMa expert parallelism: routing groups per batch shard, dispatch by all-to-all inside shard_map (moma.dispatch).

The sharded step must compute exactly what one device computes when it routes the same groups; with one routing
group the shard_map path must equal the plain one.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from lm_core import loss, optim
from lm_core import train_step as ts
from lm_core.errors import UserError
from lm_core.sharding import MeshConfig, make_mesh
from moma.depths import build_moma_model
from moma.variants import check_routing_capacity, parse_variant, routing_groups
from tests.helpers import random_batch, tiny_config

IMAGE_RANGE = (96, 128)


def padded_batch(seed: int, batch: int = 8) -> dict[str, np.ndarray]:
    """Packed rows of two documents, text and image ids mixed, and 3 padding tokens at the end of row 0."""
    out = random_batch(seed, batch=batch, seq=16, packed=True)
    out["segment_ids"][0, -3:] = 0
    out["loss_mask"][0, -4:] = 0.0
    return out


def loss_and_grads(variant: str, mesh_shape: tuple[int, ...], batch, groups: int):
    """Loss, numpy grads, the sharded grads and the compiled HLO text of one train-step gradient."""
    moma = parse_variant(variant, image_token_range=IMAGE_RANGE, routing_groups=groups)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    optimizer = optim.make_optimizer(optim.OptimizerConfig())
    graphdef, state, shardings = ts.init_train_state(
        lambda: build_moma_model(tiny_config(num_layers=2), moma, rngs=nnx.Rngs(0)), optimizer, mesh, 0)

    def compute(params, batch, rng):
        return ts.loss_and_grads(graphdef, loss.next_token_loss, params, batch, rng)

    fn = jax.jit(compute, in_shardings=(shardings.params, ts.batch_shardings(mesh, batch), None))
    with jax.set_mesh(mesh):
        value, _, grads = fn(state.params, batch, state.rng)
        hlo = fn.lower(state.params, batch, state.rng).compile().as_text()
    return float(value), jax.tree.map(np.asarray, grads), grads, hlo


def assert_same(result, expected, atol=2e-6):
    value, grads = result[:2]
    assert np.isfinite(value) and abs(value - expected[0]) < 1e-5, (value, expected[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4), grads, expected[1])


@pytest.mark.parametrize(("variant", "mesh_shape"), [
    ("mod_moe_4t4i", (2, 2, 1, 2)),  # data x fsdp x expert; MoD around the MoE of layer 0
    ("moe_4t4i", (2, 1, 1, 4)),
    ("moe_8x", (1, 1, 1, 8)),
    ("moe_2t2i", (1, 2, 1, 2)),  # 4 batch shards: two routing groups on each device
])
def test_routing_per_shard_equals_one_device_routing_the_same_groups(variant, mesh_shape):
    batch = padded_batch(1)
    expected = loss_and_grads(variant, (1, 1, 1, 1), batch, groups=8)
    result = loss_and_grads(variant, mesh_shape, batch, groups=8)
    assert_same(result, expected)
    sharded, hlo = result[2], result[3]
    experts = sharded["blocks"][1]["ffn"]["groups"]["mixed" if variant == "moe_8x" else "image"]
    assert experts["up"][...].sharding.spec[0] == "expert"  # the experts really are split over the expert axis
    assert "all-to-all" in hlo  # and the slots travel to them by all-to-all, not by a gather of the batch
    # one device routing 8 groups is not the whole-batch choice: the grouping changes the result
    whole_batch = loss_and_grads(variant, (1, 1, 1, 1), batch, groups=1)
    assert abs(whole_batch[0] - expected[0]) > 1e-5


def test_default_groups_are_the_batch_shards():
    batch = padded_batch(2)
    mesh_shape = (2, 1, 1, 4)
    assert_same(loss_and_grads("moe_4t4i", mesh_shape, batch, groups=0),
                loss_and_grads("moe_4t4i", (1, 1, 1, 1), batch, groups=8))


def test_shard_map_path_with_one_routing_group_equals_the_plain_path():
    """tensor=2 has one batch shard, so the whole batch is one group routed inside shard_map; expert weights
    are split over d_ff there (the psum path). No mesh: the plain jit path."""
    batch = padded_batch(3)
    plain = loss_and_grads("mod_moe_4t4i", (1, 1, 1, 1), batch, groups=1)
    tensor_parallel = loss_and_grads("mod_moe_4t4i", (1, 1, 2, 1), batch, groups=1)
    assert_same(tensor_parallel, plain)
    assert tensor_parallel[2]["blocks"][1]["ffn"]["groups"]["text"]["up"][...].sharding.spec[2] == "tensor"


def test_groups_spanning_shards_fall_back_to_gspmd_and_still_agree():
    """routing_groups=1 on a data-parallel mesh (the paper's whole-batch choice at any scale): no shard_map."""
    batch = padded_batch(4)
    assert_same(loss_and_grads("moe_4t4i", (2, 1, 1, 4), batch, groups=1),
                loss_and_grads("moe_4t4i", (1, 1, 1, 1), batch, groups=1))


def test_routing_group_count_and_capacity_errors():
    assert routing_groups(0, 16, 8) == 8 and routing_groups(0, 1, 8) == 1 and routing_groups(4, 16, 8) == 4
    with pytest.raises(UserError, match="routing_groups=3 does not split a batch of 16 rows"):
        routing_groups(3, 16, 1)
    with pytest.raises(UserError, match="routing_groups=32 does not split a batch of 16 rows"):
        routing_groups(32, 16, 1)
    with pytest.raises(UserError, match="routing_groups=-1 must be a non-negative integer"):
        parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE, routing_groups=-1)
    moma = parse_variant("moe_8x", max_text_fraction=0.5)
    check_routing_capacity(moma, rows=8, seq_len=1, batch_shards=1)  # 8 tokens, 8 experts: one slot each
    with pytest.raises(UserError, match=r"mixed experts get 0.12 < 1 slot each: 8 routing groups of 1 tokens"):
        check_routing_capacity(moma, rows=8, seq_len=1, batch_shards=8)
    bounded = parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE, max_image_fraction=0.25)
    with pytest.raises(UserError, match="image experts get 0.50 < 1 slot each"):
        check_routing_capacity(bounded, rows=8, seq_len=1, batch_shards=1)
    check_routing_capacity(bounded, rows=8, seq_len=16, batch_shards=8)
    # MoD layers hand their FFN ceil(0.25 * seq) tokens per row
    with pytest.raises(UserError, match="text experts get 0.50 < 1 slot each"):
        check_routing_capacity(parse_variant("mod_moe_4t4i", image_token_range=IMAGE_RANGE), rows=8, seq_len=8,
                               batch_shards=8)
