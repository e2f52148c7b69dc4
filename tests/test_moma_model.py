"""MoMa models: mixture-of-depths blocks, upcycling, training end to end, expert-parallel == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core import loss, optim
from lm_core import train_step as ts
from lm_core.errors import UserError
from lm_core.layers import TokenContext
from lm_core.model import Block, LayerInputs
from lm_core.sharding import MeshConfig, make_mesh
from moma.depths import MoDBlock, build_moma_model, row_selection, selected_context
from moma.experts import moma_ffn_factory
from moma.routing import Router, group_route
from moma.upcycle import check_upcycle, upcycle_model
from moma.variants import parse_variant
from tests.helpers import random_batch, tiny_config

IMAGE_RANGE = (96, 128)


def mod_block() -> MoDBlock:
    """A MoD block around a dense lm_core block whose router looks only at hidden coordinate 0."""
    config = tiny_config()
    block = MoDBlock(Block(config, 0, moma_ffn_factory(parse_variant("dense")), rngs=nnx.Rngs(0)), config, 0.25,
                     rngs=nnx.Rngs(1))
    block.router.weight[...] = jnp.zeros((64, 1)).at[0, 0].set(10.0)
    return block


def run_mod(block, x, segment_ids, with_kv=False):
    tokens = jnp.ones(segment_ids.shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    out, _, kv, aux = block(x, LayerInputs(TokenContext(tokens, positions, segment_ids)))
    return (out, aux, kv) if with_kv else (out, aux)


def changed_tokens(out, x):
    return np.any(np.asarray(out) != np.asarray(x), axis=-1)  # [batch, seq]


# router scores sigmoid(10 · x0): per row, 2 slots (c_d = 0.25 of 8). Row 0 picks tokens 2 and 7, row 1 tokens 5 and
# 6; a top-4 over the flattened batch would instead take 2, 7, 4 of row 0 and only 5 of row 1.
ROUTER_X0 = np.array([[0.1, -0.2, 0.5, 0.0, 0.3, -0.1, 0.2, 0.4],
                      [-0.5, 0.05, -0.3, 0.15, -0.4, 0.35, 0.25, -0.1]], np.float32)
PACKED = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)  # row 0: two documents


def scored_x(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (2, 8, 64)).at[..., 0].set(ROUTER_X0)


def sigmoid10(values) -> np.ndarray:
    return 1 / (1 + np.exp(-10 * np.asarray(values, np.float64)))


def block_on(block, x_row, positions, segments):
    """The wrapped Block run on exactly these tokens of one row: [n, d] -> [n, d]."""
    n = x_row.shape[0]
    context = TokenContext(jnp.ones((1, n), jnp.int32), jnp.asarray(positions)[None], jnp.asarray(segments)[None])
    return np.asarray(block.block(x_row[None], LayerInputs(context)).hidden[0])


def test_row_selection_by_hand():
    scores = jnp.asarray(sigmoid10(np.concatenate([ROUTER_X0, ROUTER_X0[:1]])), jnp.float32)
    real = jnp.array([[True] * 8, [True] * 3 + [False] * 5, [False] * 8])  # row 1: 3 real tokens; row 2: padding
    scores = scores.at[1, 3:].set(1.0)  # padding's scores are the best, and still never picked
    selection = row_selection(group_route(scores[..., None], real, 0.25), in_token_order=True)  # rows as groups
    np.testing.assert_array_equal(selection.index[:2], [[2, 7], [1, 2]])  # row 1: 1 (best real), then 2 (next)
    np.testing.assert_array_equal(selection.valid, [[True, True], [True, False], [False, False]])  # ceil(0.75) = 1
    np.testing.assert_allclose(selection.weight[:2], [sigmoid10([0.5, 0.4]), [sigmoid10(0.05), 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(selection.weight[2], [0.0, 0.0])
    # the sub-batch context: each row's positions and own document ids; invalid slots get segment 0
    positions = jnp.broadcast_to(jnp.arange(8), (3, 8))
    context = TokenContext(positions + 10, positions, jnp.concatenate([PACKED, PACKED[:1]]) * real)
    sub = selected_context(context, selection)
    np.testing.assert_array_equal(sub.positions[:2], [[2, 7], [1, 2]])
    np.testing.assert_array_equal(sub.tokens[:2], [[12, 17], [11, 12]])
    np.testing.assert_array_equal(sub.segment_ids, [[1, 2], [1, 0], [0, 0]])


def test_mod_processes_each_rows_top_quarter_and_the_rest_pass_through_unchanged():
    block = mod_block()
    x = scored_x()
    out, aux, kv = run_mod(block, x, PACKED, with_kv=True)
    out, x_np = np.asarray(out), np.asarray(x)
    changed = changed_tokens(out, x)
    expected = np.zeros((2, 8), bool)
    expected[0, [2, 7]] = expected[1, [5, 6]] = True
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(out[~changed], x_np[~changed])  # skipped tokens: bit for bit
    assert float(aux["mod_selected_fraction"]) == 0.25
    assert kv.keys.shape == (2, 2, 4, 8) and kv.values.shape == (2, 2, 4, 8)  # [batch, slots, kv_heads, hd]
    # the selected tokens: x + score · (Block(those tokens of the row, own positions and documents) - x)
    for row, index, segments in ((0, [2, 7], [1, 2]), (1, [5, 6], [1, 1])):
        reference = block_on(block, x[row, np.array(index)], index, segments)
        weight = sigmoid10(ROUTER_X0[row, index])[:, None]
        expected_out = x_np[row, index] + weight * (reference - x_np[row, index])
        np.testing.assert_allclose(out[row, index], expected_out, atol=1e-5)


def test_mod_padding_is_never_selected_and_short_rows_get_a_smaller_budget():
    block = mod_block()
    segments = jnp.ones((2, 8), jnp.int32).at[1, 3:].set(0)  # row 1: 3 real tokens
    x = scored_x().at[1, 3:, 0].set(5.0)  # padding has the best router scores
    out, aux = run_mod(block, x, segments)
    out, x_np = np.asarray(out), np.asarray(x)
    changed = changed_tokens(out, x)
    expected = np.zeros((2, 8), bool)
    expected[0, [2, 7]] = expected[1, 1] = True  # row 1: ceil(0.25 · 3) = 1 valid slot, its best real token
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(out[~changed], x_np[~changed])
    assert float(aux["mod_selected_fraction"]) == pytest.approx(3 / 11)  # valid slots / real tokens, batch pooled
    reference = block_on(block, x[1, 1:2], [1], [1])  # the invalid slot (token 2, segment 0) is not seen
    expected_out = x_np[1, 1] + sigmoid10(0.05) * (reference[0] - x_np[1, 1])
    np.testing.assert_allclose(out[1, 1], expected_out, atol=1e-5)


def test_mod_rows_do_not_leak_into_each_other():
    block = mod_block()
    x = scored_x()
    out = np.asarray(run_mod(block, x, PACKED)[0])
    # a new row 1, with router scores that would win every slot of a batch-wide top-k, and other documents
    other = x.at[1].set(jax.random.normal(jax.random.key(7), (8, 64)) + 1.0).at[1, :, 0].set(3.0)
    out_other = np.asarray(run_mod(block, other, PACKED.at[1, 4:].set(2))[0])
    np.testing.assert_allclose(out_other[0], out[0], atol=1e-6, rtol=0)  # row 0: same tokens, same output
    assert changed_tokens(out_other, other)[0].tolist() == changed_tokens(out, x)[0].tolist()
    assert changed_tokens(out_other, other)[1].sum() == 2 and not np.allclose(out_other[1], out[1])


def test_mod_attention_is_causal_in_the_original_order():
    block = mod_block()
    # router scores rise with position in row 0, so score order is the reverse of token order there
    scores = jnp.array([[-3, -3, -3, -3, -3, 1, 2, 3], [1.5, -3, -3, -3, -3, -3, 0.5, -3]], jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 8, 64)).at[..., 0].set(scores)
    segments = jnp.ones((2, 8), jnp.int32)
    out = np.asarray(run_mod(block, x, segments)[0])
    selected = changed_tokens(out, x)
    assert selected[0, 6:].all() and selected[1, [0, 6]].all() and selected.sum() == 4
    # move row 0's last token (the best-scored) without touching coordinate 0, so the selection stays the same:
    # the earlier selected token of row 0 and the other row's tokens must not see it
    moved = x.at[0, 7, 1:].add(3.0)
    out_moved = np.asarray(run_mod(block, moved, segments)[0])
    assert (changed_tokens(out_moved, moved) == selected).all()
    others = selected.copy()
    others[0, 7] = False
    np.testing.assert_allclose(out_moved[others], out[others], atol=1e-6)
    assert not np.allclose(out_moved[0, 7], out[0, 7])
    # ... while the later selected token does see the earlier one
    earlier = x.at[0, 6, 1:].add(3.0)
    assert not np.allclose(np.asarray(run_mod(block, earlier, segments)[0])[0, 7], out[0, 7], atol=1e-3)


@pytest.mark.parametrize("scan", [False, True])
def test_upcycled_experts_are_copies_of_the_modality_ffn(scan):
    config = tiny_config(num_layers=1 + scan, scan_layers=scan)  # scanned: experts stacked behind a layer axis
    source_moma = parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE)
    target_moma = parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE, router_noise=True)
    source = build_moma_model(config, source_moma, rngs=nnx.Rngs(0))
    upcycled = upcycle_model(source, source_moma, target_moma, rngs=nnx.Rngs(1))
    for layer in range(config.num_layers):
        for modality in ("text", "image"):
            ffn = source.block(layer).ffn.groups[modality]
            experts = upcycled.block(layer).ffn.groups[modality]
            for name in ("gate", "up", "down"):
                for e in range(4):
                    one = getattr(ffn, name)[...][0]
                    np.testing.assert_array_equal(getattr(experts, name)[...][e], one / 4 if name == "down" else one)
            # every router column is the 1t1i gate's
            np.testing.assert_array_equal(experts.router.weight[...], np.repeat(ffn.router.weight[...], 4, axis=1))
    np.testing.assert_array_equal(upcycled.embedding.table[...], source.embedding.table[...])
    np.testing.assert_array_equal(upcycled.block(0).attention.query_proj[...],
                                  source.block(0).attention.query_proj[...])

    # at the paper's capacity 1, a token's FFN output is the 1t1i output times (experts that chose it) / 4; the
    # copied routers rank alike, so that is all 4 experts (the top quarter of the tokens by gate) or none
    tokens = jnp.array([[5, 100, 7, 120, 9, 101], [110, 3, 111, 4, 112, 6]])
    context = TokenContext(tokens, jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32))
    x = jax.random.normal(jax.random.key(3), (2, 6, 64))
    moe = upcycled.block(0).ffn
    y_source, _ = source.block(0).ffn(x, context)
    y_upcycled, _ = moe(x, context)
    chosen_by = jnp.zeros(12)
    for name, eligible in moe.eligible(context).items():
        if name in moe.groups:
            _, routing = moe.groups[name](x.reshape(1, 12, 64), eligible.reshape(1, 12))  # one routing group
            chosen_by = chosen_by.at[routing.token_index.reshape(-1)].add(routing.valid.reshape(-1))
    assert set(np.asarray(chosen_by).tolist()) == {0.0, 4.0}
    np.testing.assert_allclose(y_upcycled.reshape(12, 64), y_source.reshape(12, 64) * chosen_by[:, None] / 4,
                               atol=1e-5)


@pytest.mark.parametrize("variant,scan", [("moe", False), ("moe", True), ("mod_moe", False)])
def test_upcycled_model_is_the_1t1i_seed_when_every_expert_keeps_every_token(variant, scan, monkeypatch):
    # pre-norm, where a token's FFN output scale reaches the residual stream: Swin post-norm would normalise a
    # per-token scale away and hide a missing gate
    config = tiny_config(scan_layers=scan, norm_placement="pre")
    source_moma = parse_variant(f"{variant}_1t1i", image_token_range=IMAGE_RANGE)
    # moma.upcycle's condition: capacity_factor = |group| (and unbounded slots), so each expert keeps every token
    target_moma = parse_variant(f"{variant}_4t4i", image_token_range=IMAGE_RANGE, capacity_factor=4.0,
                                router_noise=True)  # noise only with a training rng, not here
    source = build_moma_model(config, source_moma, rngs=nnx.Rngs(0))
    upcycled = upcycle_model(source, source_moma, target_moma, rngs=nnx.Rngs(1))
    batch = random_batch(0, batch=2, seq=16, packed=True)  # ~1/4 image codes (ids 96..127), two documents a row

    def logits(model) -> np.ndarray:
        return np.asarray(model(jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]),
                                segment_ids=jnp.asarray(batch["segment_ids"])).logits)

    np.testing.assert_allclose(logits(upcycled), logits(source), rtol=1e-5, atol=1e-5)

    # without the 1t1i gate (gate 1, as 1t1i had before) the same upcycling is not the seed
    gated = Router.scores
    monkeypatch.setattr(Router, "scores", lambda router, x, rng=None: jnp.ones((*x.shape[:-1], 1), jnp.float32)
                        if not router.aux_router_outputs else gated(router, x, rng))
    assert not np.allclose(logits(upcycled), logits(source), rtol=1e-3, atol=1e-3)


def test_upcycling_errors():
    one_each = parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE)
    with pytest.raises(UserError, match="starts from a moe_1t1i model, not 'moe_4t4i'"):
        check_upcycle(parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE), one_each)
    with pytest.raises(UserError, match="produces a moe_<m>t<n>i model, not 'moe_8x'"):
        check_upcycle(one_each, parse_variant("moe_8x"))
    with pytest.raises(UserError, match="mod differs"):
        check_upcycle(one_each, parse_variant("mod_moe_4t4i", image_token_range=IMAGE_RANGE))


def padded_batch(seed: int, batch: int = 8) -> dict[str, np.ndarray]:
    """Packed rows of two documents, text and image ids mixed, and 3 padding tokens at the end of row 0."""
    out = random_batch(seed, batch=batch, seq=16, packed=True)
    out["segment_ids"][0, -3:] = 0
    out["loss_mask"][0, -4:] = 0.0
    return out


def test_mod_moma_model_trains():
    structure = nnx.eval_shape(lambda: build_moma_model(
        tiny_config(num_layers=4), parse_variant("mod_dense"), rngs=nnx.Rngs(0)))
    assert [isinstance(b, MoDBlock) for b in structure.blocks] == [True, False, True, False]

    config = tiny_config(norm_placement="swin", qk_norm=True, remat=True)  # Chameleon's stabilisers
    moma = parse_variant("mod_moe_2t2i", image_token_range=IMAGE_RANGE, router_noise=True)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0, learning_rate=1e-2))
    graphdef, state, shardings = ts.init_train_state(
        lambda: build_moma_model(config, moma, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
    loss_fn = functools.partial(loss.next_token_loss, z_loss_weight=1e-5)  # lends the step's rng: router noise
    step = ts.make_train_step(graphdef, loss_fn, optimizer, mesh, shardings)
    batch = padded_batch(0, batch=4)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert "aux_loss" not in metrics  # expert choice and MoD add no auxiliary loss
