"""Expert-choice routing by hand, MoE == a slow reference loop, modality separation, sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core import loss, optim
from lm_core import train_step as ts
from lm_core.errors import UserError
from lm_core.layers import TokenContext
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, make_mesh
from moma.experts import ExpertGroup, ModalityAwareMoE, expert_choice, moma_ffn_factory
from moma.variants import check_fits_mesh, parse_variant
from tests.helpers import tiny_config

IMAGE_RANGE = (96, 128)  # in the 128-token test vocabulary, ids 96..127 are "image codes"


def test_expert_choice_by_hand():
    scores = jnp.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.95, 0.99], [0.5, 0.5]])
    eligible = jnp.array([True, True, True, False, True])  # token 3 has the best scores but is not eligible
    routing = expert_choice(scores, eligible, capacity_factor=1.0)
    # k_max = ceil(5 / 2) = 3 slots; budget = ceil(4 eligible / 2) = 2 tokens per expert
    assert routing.token_index.shape == (2, 3)
    np.testing.assert_array_equal(routing.used, [[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(routing.token_index[:, :2], [[0, 1], [1, 2]])
    np.testing.assert_allclose(routing.gate, [[0.9, 0.8, 0.0], [0.7, 0.6, 0.0]])


def reference_group(group: ExpertGroup, x, eligible, capacity_factor):
    """Slow and obvious: loop over experts, rank eligible tokens by score, add gate * FFN_j(x) to the chosen."""
    scores = np.asarray(group.scores(x))
    n_eligible = int(np.sum(eligible))
    budget = int(np.ceil(capacity_factor * n_eligible / group.num_experts))
    out = np.zeros(x.shape, np.float32)
    for e in range(group.num_experts):
        candidates = [t for t in np.argsort(-scores[:, e], kind="stable") if eligible[t]][:budget]
        for t in candidates:
            h = x[t] @ group.gate[...][e]
            h = (h * jax.nn.sigmoid(h)) * (x[t] @ group.up[...][e])
            out[t] += scores[t, e] * np.asarray(h @ group.down[...][e])
    return out


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0, 0.5])
def test_gather_scatter_moe_equals_reference_loop(capacity_factor):
    group = ExpertGroup(tiny_config(), 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (24, 64))
    eligible = jax.random.uniform(jax.random.key(2), (24,)) > 0.3
    fast, routing = group(x, eligible, capacity_factor)
    np.testing.assert_allclose(fast, reference_group(group, x, np.asarray(eligible), capacity_factor), atol=1e-5)
    assert bool(jnp.all(eligible[routing.token_index] | ~routing.used))  # only eligible tokens are routed


def context_for(tokens, segment_ids=None):
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    return TokenContext(tokens, jnp.zeros_like(tokens), segment_ids)


def test_modalities_use_their_own_experts_and_padding_is_skipped():
    config = tiny_config()
    moe = ModalityAwareMoE(config, parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 100, 7, 120, 9, 0], [110, 3, 111, 4, 112, 0]])
    segments = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    x = jax.random.normal(jax.random.key(3), (2, 6, 64))
    y, aux = moe(x, context_for(tokens, segments))
    assert y.shape == x.shape
    np.testing.assert_allclose(y[:, 5], 0.0)  # padding positions get no expert output
    flat = x.reshape(-1, 64)
    image = (tokens.reshape(-1) >= 96) & (segments.reshape(-1) == 1)
    text = (tokens.reshape(-1) < 96) & (segments.reshape(-1) == 1)
    _, text_routing = moe.groups["text"](flat, text, 1.0)
    _, image_routing = moe.groups["image"](flat, image, 1.0)
    assert bool(jnp.all(text[text_routing.token_index] | ~text_routing.used))
    assert bool(jnp.all(image[image_routing.token_index] | ~image_routing.used))
    # changing an image token's hidden state cannot change any text token's output
    moved = x.at[0, 1].add(5.0)
    y_moved, _ = moe(moved, context_for(tokens, segments))
    text_positions = np.asarray(text.reshape(2, 6))
    np.testing.assert_allclose(np.asarray(y_moved)[text_positions], np.asarray(y)[text_positions], atol=1e-5)
    assert 0 < float(aux["text_experts_per_token"]) <= 4


def test_one_expert_per_modality_is_a_modality_specific_dense_ffn():
    config = tiny_config()
    moe = ModalityAwareMoE(config, parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 100, 7]])
    x = jax.random.normal(jax.random.key(4), (1, 3, 64))
    y, _ = moe(x, context_for(tokens))
    text_ffn, image_ffn = moe.groups["text"], moe.groups["image"]
    np.testing.assert_allclose(y[0, 0], text_ffn(x[:, :1])[0][0, 0], atol=1e-6)
    np.testing.assert_allclose(y[0, 1], image_ffn(x[:, 1:2])[0][0, 0], atol=1e-6)


def test_variants_and_errors():
    assert parse_variant("moe_4t4i").groups == {"text": 4, "image": 4}
    assert parse_variant("moe_8x").groups == {"mixed": 8}
    assert parse_variant("mod_moe_1t1i").mod and parse_variant("dense").is_dense
    with pytest.raises(UserError, match="unknown MoMa variant 'moe_4t'"):
        parse_variant("moe_4t")
    with pytest.raises(UserError, match="capacity_factor=0"):
        parse_variant("moe_8x", capacity_factor=0)
    with pytest.raises(UserError, match="expert axis of size 4"):
        check_fits_mesh(parse_variant("moe_2t2i"), 4)
    check_fits_mesh(parse_variant("moe_4t4i"), 4)


def moe_loss_and_grads(mesh_shape, batch):
    moma = parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    optimizer = optim.make_optimizer(optim.OptimizerConfig())
    graphdef, state, shardings = ts.init_train_state(
        lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0), ffn_factory=moma_ffn_factory(moma)), optimizer, mesh, 0)

    def compute(params, batch, rng):
        return ts.loss_and_grads(graphdef, loss.next_token_loss, params, batch, rng)

    fn = jax.jit(compute, in_shardings=(shardings.params, ts.batch_shardings(mesh, batch), None))
    with jax.set_mesh(mesh):
        value, _, grads = fn(state.params, batch, state.rng)
    return float(value), jax.tree.map(np.asarray, grads), grads


def test_expert_parallel_loss_and_gradients_equal_single_device():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
    expected_loss, expected_grads, _ = moe_loss_and_grads((1, 1, 1, 1), batch)
    value, grads, sharded = moe_loss_and_grads((2, 1, 1, 4), batch)
    assert np.isfinite(value) and abs(value - expected_loss) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, expected_grads)
    spec = sharded["blocks"][0]["ffn"]["groups"]["text"]["gate"][...].sharding.spec
    assert spec[0] == "expert"  # the experts really are split over the expert axis
