"""Mixture-of-depths routing, upcycling 1t1i -> 4t4i, and a MoMa model training end to end."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_core import loss, optim
from lm_core import train_step as ts
from lm_core.layers import TokenContext
from lm_core.sharding import MeshConfig, make_mesh
from moma.depths import MoDBlock, build_moma_model
from moma.upcycle import upcycle_params
from moma.variants import parse_variant
from tests.helpers import tiny_config

IMAGE_RANGE = (96, 128)


def test_mod_processes_a_quarter_of_the_tokens_and_the_rest_skip():
    model = build_moma_model(tiny_config(num_layers=2), parse_variant("mod_moe_1t1i", image_token_range=IMAGE_RANGE),
                             rngs=nnx.Rngs(0))
    block = model.blocks[0]
    assert isinstance(block, MoDBlock) and not isinstance(model.blocks[1], MoDBlock)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 128)
    context = TokenContext(tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones((2, 8), jnp.int32))
    x = jax.random.normal(jax.random.key(1), (2, 8, 64))
    out, _, _, aux = block(x, context, None, None, None, None)
    changed = np.any(np.abs(np.asarray(out - x)) > 0, axis=-1)
    assert changed.sum() == 4  # c_d = 0.25 of 16 tokens
    assert float(aux["mod_selected_fraction"]) == 0.25
    np.testing.assert_array_equal(np.asarray(out)[~changed], np.asarray(x)[~changed])


def test_upcycled_experts_are_copies_of_the_modality_ffn():
    config = tiny_config()
    source = build_moma_model(config, parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(0))
    target = build_moma_model(config, parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(1))
    graphdef, target_params = nnx.split(target, nnx.Param)
    upcycled = nnx.merge(graphdef, upcycle_params(nnx.state(source, nnx.Param), target_params))
    for modality in ("text", "image"):
        dense_ffn = source.blocks[1].ffn.groups[modality]
        experts = upcycled.blocks[1].ffn.groups[modality]
        for name in ("gate", "up", "down"):
            for e in range(4):
                np.testing.assert_array_equal(getattr(experts, name)[...][e], getattr(dense_ffn, name)[...])
        np.testing.assert_array_equal(experts.router[...], target.blocks[1].ffn.groups[modality].router[...])
    np.testing.assert_array_equal(upcycled.embedding.table[...], source.embedding.table[...])


def test_moma_variants_train():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((4, 16), np.float32)}
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    for variant in ("moe_8x", "mod_moe_2t2i"):
        moma = parse_variant(variant, image_token_range=IMAGE_RANGE)
        optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0, learning_rate=1e-2))
        graphdef, state, shardings = ts.init_train_state(
            lambda moma=moma: build_moma_model(tiny_config(), moma, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
        step = ts.make_train_step(graphdef, loss.next_token_loss, optimizer, mesh, shardings)
        losses = []
        for _ in range(4):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], (variant, losses)
