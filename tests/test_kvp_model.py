"""KV prediction: the predictor, the training forward pass, the 3-term loss and the frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kv_prediction.loss import kvp_loss, masked_l1, normalized_keys
from kv_prediction.model import KVPModel
from kv_prediction.optim import make_kvp_optimizer, trainable_filter
from kv_prediction.predictor import KVPredictor
from lm_core.attention import LayerKV
from lm_core.config import ModelConfig
from lm_core.loss import cross_entropy
from lm_core.model import Transformer
from lm_core.optim import OptimizerConfig
from lm_core.sharding import LOGICAL_AXIS_RULES, MeshConfig, make_mesh
from lm_core.train_step import init_train_state, loss_and_grads, make_train_step, param_shardings

BASE = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32)


def config(**changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})


NARROW = config(num_layers=2, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32)


def lp_model(seed: int = 0, **changes) -> KVPModel:
    return KVPModel.layer_pruned(Transformer(config(**changes), rngs=nnx.Rngs(seed)), 0.5, rngs=nnx.Rngs(seed + 1))


def padded_batch(seed: int = 0, batch: int = 2, seq: int = 12) -> dict[str, jax.Array]:
    """Row 0: two packed documents; row 1: one document and 3 padding tokens at the end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, (batch, seq + 1)).astype(np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[0, 5:] = 2
    segment_ids[1, seq - 3:] = 0
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    positions[0, 5:] -= 5
    positions[1, seq - 3:] = 0
    loss_mask = (segment_ids != 0).astype(np.float32)
    loss_mask[0, 4] = 0.0  # the last token of document 1 has no target inside it
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions),
            "loss_mask": jnp.asarray(loss_mask)}


def test_predictor_identity_init_and_flattened_linear_map():
    base_cfg = config()
    aux_cfg = config(num_layers=2)
    layer_map = [0, 0, 1, 1]
    kv = [LayerKV(jax.random.normal(jax.random.key(i), (2, 5, 2, 8)),
                  jax.random.normal(jax.random.key(10 + i), (2, 5, 2, 8))) for i in range(2)]
    square = KVPredictor(base_cfg, aux_cfg, layer_map, rngs=nnx.Rngs(0))
    for i, predicted in enumerate(square(kv)):  # same shapes: starts as the identity (aux layer j(i) passes through)
        np.testing.assert_array_equal(predicted.keys, kv[layer_map[i]].keys)
        np.testing.assert_array_equal(predicted.values, kv[layer_map[i]].values)

    narrow_kv = [LayerKV(x.keys[:, :, :1], x.values[:, :, :1]) for x in kv]  # [2, 5, 1, 8]
    predictor = KVPredictor(base_cfg, NARROW, layer_map, rngs=nnx.Rngs(0))
    layer = predictor.layers[3].values
    layer.bias.set_value(jax.random.normal(jax.random.key(3), layer.bias.shape))
    predicted = predictor(narrow_kv)
    assert len(predicted) == 4 and predicted[3].values.shape == (2, 5, 2, 8)
    # The same map written as the paper does: flatten heads, x @ W + b, unflatten.
    flat = narrow_kv[1].values.reshape(2, 5, 8) @ layer.kernel[...].reshape(8, 16) + layer.bias[...].reshape(16)
    np.testing.assert_allclose(predicted[3].values, flat.reshape(2, 5, 2, 8), atol=1e-5)
    with pytest.raises(ValueError, match="K,V of 2 aux layers, got 1"):
        predictor(narrow_kv[:1])


def test_predictor_parameters_shard_by_logical_axes():
    model = nnx.eval_shape(lambda: KVPModel(Transformer(config(), rngs=nnx.Rngs(0)),
                                            Transformer(NARROW, rngs=nnx.Rngs(1)), rngs=nnx.Rngs(2)))
    params = nnx.state(model.predictor, nnx.Param)
    for variable in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert all(name is None or name in LOGICAL_AXIS_RULES for name in variable.logical_axes)
    mesh = make_mesh(MeshConfig(data=1, tensor=2), jax.devices()[:2])
    shardings = param_shardings(mesh, params)
    assert tuple(shardings["layers"][0]["keys"]["kernel"].get_value().spec) == (None, None, "tensor", None)


def test_forward_train_parts():
    model = lp_model(qk_norm=True)
    batch = padded_batch()
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    out = model.forward_train(*args)
    base_logits, aux_logits = model.base.logits(out.base_hidden), model.aux.logits(out.aux_hidden)
    assert base_logits.shape == aux_logits.shape == (2, 12, 64)
    assert len(out.predicted_kv) == len(out.true_kv) == 4 and out.predicted_kv[2].keys.shape == (2, 12, 2, 8)
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    true = model.base(batch["inputs"], return_kv=True, **kw)
    for got, want in zip(out.true_kv, true.kv, strict=True):
        np.testing.assert_allclose(got.keys, want.keys, atol=1e-6)
    injected = model.base(batch["inputs"], injected_kv=out.predicted_kv, **kw).logits
    np.testing.assert_allclose(base_logits, injected, atol=1e-5)
    np.testing.assert_allclose(model(batch["inputs"], **kw).logits, base_logits, atol=1e-5)


def test_masked_l1_by_hand():
    predicted = jnp.array([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [batch 1, seq 2, heads 1, head_dim 2]
    target = jnp.array([[[[0.0, 0.0]], [[3.0, 0.0]]]])  # token 0: |1|+|2| = 3; token 1: 0+|4| = 4
    assert float(masked_l1(predicted, target, jnp.array([[1.0, 1.0]]))) == pytest.approx(7 / 4)
    assert float(masked_l1(predicted, target, jnp.array([[1.0, 0.0]]))) == pytest.approx(3 / 2)
    assert float(masked_l1(predicted, target, jnp.array([[0.0, 0.0]]))) == 0.0


def test_kvp_loss_composition_and_padding():
    model = lp_model()
    batch = padded_batch()
    loss, metrics = kvp_loss(model, batch, None, lambda_aux=0.5)
    out = model.forward_train(batch["inputs"], batch["positions"], batch["segment_ids"])
    base_ce = cross_entropy(model.base.logits(out.base_hidden), batch["targets"], batch["loss_mask"])[0]
    aux_ce = cross_entropy(model.aux.logits(out.aux_hidden), batch["targets"], batch["loss_mask"])[0]
    real = np.asarray(batch["segment_ids"]) != 0  # K,V of every real token count, even without a target
    consistency = sum(np.mean(np.abs(np.asarray(p) - np.asarray(t))[real])
                      for layer_p, layer_t in zip(out.predicted_kv, out.true_kv, strict=True)
                      for p, t in zip(layer_p, layer_t, strict=True))
    np.testing.assert_allclose(metrics["consistency"], consistency, rtol=1e-5)
    np.testing.assert_allclose(loss, base_ce + 0.5 * aux_ce + consistency / 4, rtol=1e-5)  # λ_C = 1/n_base
    assert float(metrics["base_ce"]) == pytest.approx(float(base_ce)) and float(metrics["tokens"]) == 20
    # Padding tokens change neither the cross-entropies nor the consistency term.
    changed = dict(batch, inputs=batch["inputs"].at[1, -3:].set(7))
    np.testing.assert_allclose(kvp_loss(model, changed, None, lambda_aux=0.5)[0], loss, rtol=1e-6)
    summed = kvp_loss(model, batch, None, lambda_consistency=1.0)[0]
    np.testing.assert_allclose(summed, base_ce + aux_ce + consistency, rtol=1e-5)
    off = kvp_loss(model, batch, None, lambda_consistency=0.0)[0]  # the paper's ablation: 0 is off, not "default"
    np.testing.assert_allclose(off, base_ce + aux_ce, rtol=1e-5)


def test_normalized_keys_ignore_the_scale_invisible_under_qk_norm():
    base = Transformer(config(qk_norm=True), rngs=nnx.Rngs(0))
    keys = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    values = jnp.ones_like(keys)
    small, large = normalized_keys(base, [LayerKV(keys, values)] * 4), normalized_keys(base, [LayerKV(3 * keys,
                                                                                                       values)] * 4)
    np.testing.assert_allclose(small[0].keys, large[0].keys, atol=1e-5)
    plain = Transformer(config(), rngs=nnx.Rngs(0))
    assert normalized_keys(plain, [LayerKV(keys, values)])[0].keys is keys


def test_training_moves_only_aux_and_predictor():
    # On a data x fsdp x tensor mesh, with the base's optimizer state an empty MaskedNode.
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    optimizer = make_kvp_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    create = lambda: lp_model(qk_norm=True, num_layers=2)
    graphdef, state, shardings = init_train_state(create, optimizer, mesh, seed=0)
    batch = {name: jnp.concatenate([value, value]) for name, value in padded_batch().items()}  # 4 rows

    grads = jax.jit(lambda p: loss_and_grads(graphdef, kvp_loss, p, batch, state.rng)[2])(state.params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["base"]))  # exactly zero, not small
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["predictor"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["aux"]))

    sizes = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    trainable = sizes(state.params["aux"]) + sizes(state.params["predictor"])
    assert sizes(state.opt_state) <= 2 * trainable + 8  # Adam moments for A and P only, none for the base

    before = jax.tree.map(np.array, state.params)  # host copies: the step donates the state
    train_step = make_train_step(graphdef, kvp_loss, optimizer, mesh, shardings)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["objective"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    for old, new in zip(jax.tree.leaves(before["base"]), jax.tree.leaves(state.params["base"]), strict=True):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(before["aux"]["blocks"][0]["attention"]["key_proj"].get_value(),
                              state.params["aux"]["blocks"][0]["attention"]["key_proj"].get_value())
    assert not np.array_equal(before["predictor"]["layers"][0]["keys"]["bias"].get_value(),
                              state.params["predictor"]["layers"][0]["keys"]["bias"].get_value())


def test_trainable_filter_excludes_the_base():
    trainable = nnx.state(lp_model(), trainable_filter)
    assert set(trainable.keys()) == {"aux", "predictor"}


def test_kvp_loss_chunked_output_layer_matches_full_logits():
    # chunk_tokens only changes how the two output layers are computed (7 does not divide the 24 tokens: padding)
    model = lp_model(qk_norm=True)
    batch = padded_batch()
    full_loss, full = kvp_loss(model, batch, None, z_loss_weight=1e-3)
    chunked_loss, chunked = kvp_loss(model, batch, None, z_loss_weight=1e-3, chunk_tokens=7)
    np.testing.assert_allclose(chunked_loss, full_loss, rtol=1e-6)
    for name in ("base_ce", "aux_ce", "z_loss", "aux_z_loss", "nll", "tokens"):
        np.testing.assert_allclose(chunked[name], full[name], rtol=1e-6)
