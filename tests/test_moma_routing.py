"""MoMa routing: expert choice by hand, gather/scatter == a slow loop, modality separation, variants, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.layers import TokenContext
from moma.experts import ExpertGroup, ModalityAwareMoE
from moma.flops import compute_matched_mod_layers, executed_expert_overhead, ffn_layer_flops
from moma.routing import Router, expert_choice_route
from moma.variants import check_fits_mesh, check_fits_model, image_token_mask, parse_variant
from tests.helpers import tiny_config

IMAGE_RANGE = (96, 128)  # in the 128-token test vocabulary, ids 96..127 are "image codes"
# two rows of 6: text ids < 96, image ids >= 96, the last position of each row is padding (segment 0)
TOKENS = jnp.array([[5, 100, 7, 120, 9, 0], [110, 3, 111, 4, 112, 0]])
SEGMENTS = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])


def context_for(tokens, segment_ids=None):
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    return TokenContext(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), segment_ids)


def swiglu(x, gate, up, down):
    h = x @ gate
    return (h * jax.nn.sigmoid(h) * (x @ up)) @ down


def test_expert_choice_route_by_hand():
    scores = jnp.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.95, 0.99], [0.5, 0.5]])
    eligible = jnp.array([True, True, True, False, True])  # token 3 has the best scores but is not eligible
    routing = expert_choice_route(scores, eligible, capacity_factor=1.0)
    # slots = ceil(5 tokens / 2 experts) = 3; budget = ceil(4 eligible / 2) = 2 tokens per expert
    assert routing.token_index.shape == (2, 3) and float(routing.budget) == 2
    np.testing.assert_array_equal(routing.valid, [[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(routing.token_index[:, :2], [[0, 1], [1, 2]])
    np.testing.assert_allclose(routing.gate, [[0.9, 0.8, 0.0], [0.7, 0.6, 0.0]])
    # capacity 2: budget 4 = every eligible token, best first; token 3 never
    routing = expert_choice_route(scores, eligible, capacity_factor=2.0)
    np.testing.assert_array_equal(np.where(routing.valid, routing.token_index, -1),
                                  [[0, 1, 4, 2, -1], [1, 2, 4, 0, -1]])
    # static slots for at most 40% of the batch: ceil(0.4 * 5 / 2) = 1 slot, so each expert keeps its best token
    routing = expert_choice_route(scores, eligible, capacity_factor=1.0, max_fraction=0.4)
    np.testing.assert_array_equal(routing.token_index, [[0], [1]])
    np.testing.assert_allclose(routing.gate, [[0.9], [0.7]])


def reference_group(group: ExpertGroup, x, eligible):
    """Slow and obvious: loop over experts, rank eligible tokens by sigmoid score, add gate * FFN_j(x)."""
    x, eligible = np.asarray(x), np.asarray(eligible)
    scores = np.asarray(jax.nn.sigmoid(x @ np.asarray(group.router.weight[...])))
    budget = int(np.ceil(group.router.capacity * eligible.sum() / group.num_experts))
    out = np.zeros(x.shape, np.float32)
    for e in range(group.num_experts):
        for t in [t for t in np.argsort(-scores[:, e], kind="stable") if eligible[t]][:budget]:
            out[t] += scores[t, e] * np.asarray(swiglu(x[t], group.gate[...][e], group.up[...][e],
                                                       group.down[...][e]))
    return out


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0, 0.5])
def test_gather_scatter_group_equals_reference_loop(capacity_factor):
    group = ExpertGroup(tiny_config(), 4, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (24, 64))
    eligible = jax.random.uniform(jax.random.key(2), (24,)) > 0.3
    fast, routing = group(x[None], eligible[None])  # one routing group
    np.testing.assert_allclose(fast[0], reference_group(group, x, eligible), atol=1e-5)
    # the gates are the sigmoid scores of the chosen tokens, and only eligible tokens are chosen
    scores = jax.nn.sigmoid(x @ group.router.weight[...])
    chosen_scores = jnp.take_along_axis(scores.T, routing.token_index[0], axis=1)
    np.testing.assert_allclose(routing.gate[0], jnp.where(routing.valid[0], chosen_scores, 0.0), rtol=1e-6)
    assert bool(jnp.all(eligible[routing.token_index] | ~routing.valid))


def test_routing_groups_route_each_group_on_its_own():
    """Four groups of 6 tokens: each group's result is the reference loop on that group alone."""
    group = ExpertGroup(tiny_config(), 4, capacity_factor=1.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, 64))
    eligible = jax.random.uniform(jax.random.key(2), (4, 6)) > 0.3
    fast, routing = group(x, eligible)
    assert routing.token_index.shape == (4, 4, 2)  # ceil(6 tokens / 4 experts) = 2 slots per group
    for g in range(4):
        np.testing.assert_allclose(fast[g], reference_group(group, x[g], eligible[g]), atol=1e-5)


def test_modalities_use_their_own_experts_and_padding_is_never_routed():
    moe = ModalityAwareMoE(tiny_config(), parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE),
                           rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 6, 64))
    context = context_for(TOKENS, SEGMENTS)
    y, aux = moe(x, context)
    np.testing.assert_allclose(y[:, 5], 0.0)  # padding gets no expert output
    eligible = {name: mask.reshape(1, -1) for name, mask in moe.eligible(context).items()}
    image = np.asarray(image_token_mask(TOKENS, IMAGE_RANGE) & (SEGMENTS == 1)).reshape(1, -1)
    np.testing.assert_array_equal(eligible["image"], image)
    for name in ("text", "image"):
        _, routing = moe.groups[name](x.reshape(1, 12, 64), eligible[name])
        assert bool(jnp.all(eligible[name][0][routing.token_index] | ~routing.valid))  # own modality only
    # 5 text tokens, 4 experts: each takes ceil(5/4) = 2, so 8 expert slots over 5 tokens = 1.6 per token
    assert float(aux["text_experts_per_token"]) == pytest.approx(1.6)
    np.testing.assert_allclose(aux["image_expert_load"], [0.4] * 4)
    assert float(aux["text_slot_overflow"]) == 0.0
    # an image token's hidden state cannot change any text token's output, and vice versa
    text = np.asarray(eligible["text"]).reshape(2, 6)
    image = image.reshape(2, 6)
    y_image_moved, _ = moe(x.at[0, 1].add(5.0), context)
    np.testing.assert_allclose(np.asarray(y_image_moved)[text], np.asarray(y)[text], atol=1e-5)
    y_text_moved, _ = moe(x.at[1, 1].add(5.0), context)
    np.testing.assert_allclose(np.asarray(y_text_moved)[image], np.asarray(y)[image], atol=1e-5)


def test_one_expert_per_modality_is_a_gated_modality_specific_ffn():
    moe = ModalityAwareMoE(tiny_config(), parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE),
                           rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 6, 64))
    y, aux = moe(x, context_for(TOKENS, SEGMENTS))
    for (row, col), name in [((0, 0), "text"), ((0, 1), "image"), ((1, 3), "text"), ((1, 4), "image")]:
        ffn = moe.groups[name]
        gate = jax.nn.sigmoid(x[row, col] @ ffn.router.weight[...][:, 0])  # Eq. 1's gate, one router column
        np.testing.assert_allclose(y[row, col], gate * swiglu(x[row, col], ffn.gate[...][0], ffn.up[...][0],
                                                              ffn.down[...][0]), atol=1e-5)
    np.testing.assert_allclose(y[:, 5], 0.0)
    assert float(aux["text_routed_fraction"]) == 1.0 and float(aux["image_experts_per_token"]) == 1.0


def test_mixed_group_routes_both_modalities_but_not_padding():
    moe = ModalityAwareMoE(tiny_config(), parse_variant("moe_8x", image_token_range=IMAGE_RANGE, capacity_factor=2.0),
                           rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 6, 64))
    context = context_for(TOKENS, SEGMENTS)
    _, routing = moe.groups["mixed"](x.reshape(1, 12, 64), moe.eligible(context)["mixed"].reshape(1, 12))
    routed = np.unique(np.asarray(routing.token_index)[np.asarray(routing.valid)])
    assert 5 not in routed and 11 not in routed  # the padding positions
    assert {1, 3} & set(routed) and {0, 2} & set(routed)  # image and text tokens share the experts
    _, aux = moe(x, context)
    assert float(aux["mixed_experts_per_token"]) == pytest.approx(8 * 3 / 10)  # budget ceil(2 * 10 / 8) = 3
    # the routed share per modality, counted by hand from the slots: which of the real tokens any expert took
    image = np.asarray(image_token_mask(TOKENS, IMAGE_RANGE)).reshape(-1)
    real = np.asarray(SEGMENTS).reshape(-1) != 0
    chosen = np.isin(np.arange(12), routed)
    for modality, mask in (("image", real & image), ("text", real & ~image)):
        assert float(aux[f"mixed_{modality}_routed_fraction"]) == pytest.approx(chosen[mask].mean())
    assert "text_image_routed_fraction" not in aux  # only a mixed group splits its share by modality


def test_router_noise_comes_with_the_calls_rng():
    moma = parse_variant("moe_2t2i", image_token_range=IMAGE_RANGE, router_noise=True)
    moe = ModalityAwareMoE(tiny_config(), moma, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (12, 64))
    router = moe.groups["text"].router
    clean = router.scores(x)
    np.testing.assert_allclose(clean, jax.nn.sigmoid(x @ router.weight[...]), rtol=1e-6)
    # Gumbel-sigmoid: one standard logistic draw added to the logits
    noise = jax.random.logistic(jax.random.key(0), (12, 2))
    np.testing.assert_allclose(router.scores(x, jax.random.key(0)), jax.nn.sigmoid(x @ router.weight[...] + noise),
                               rtol=1e-5)
    quiet = ModalityAwareMoE(tiny_config(), parse_variant("moe_2t2i", image_token_range=IMAGE_RANGE),
                             rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(quiet.groups["text"].router.scores(x, jax.random.key(0)), clean)  # noise off


@pytest.mark.parametrize("scan", [False, True])
def test_a_calls_rng_gives_every_layer_and_group_its_own_noise(scan):
    from moma.depths import build_moma_model
    from tests.helpers import random_batch

    moma = parse_variant("moe_2t2i", image_token_range=IMAGE_RANGE, router_noise=True)
    model = build_moma_model(tiny_config(num_layers=2, scan_layers=scan), moma, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(0, batch=2, seq=16, packed=True).items()}
    seen, scores = [], Router.scores

    def record(router, x, rng=None):
        seen.append(rng)
        return scores(router, x, rng)

    def logits(rng):
        return np.asarray(model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                rng=rng).logits)

    clean, noisy = logits(None), logits(jax.random.key(0))
    assert not np.allclose(clean, noisy) and not np.allclose(noisy, logits(jax.random.key(1)))
    np.testing.assert_array_equal(noisy, logits(jax.random.key(0)))
    if not scan:  # one key per (layer, group), all different: no two routers draw the same noise
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Router, "scores", record)
            logits(jax.random.key(0))
        keys = {tuple(np.asarray(jax.random.key_data(key)).tolist()) for key in seen}
        assert len(seen) == 4 and len(keys) == 4


def test_scanned_and_unrolled_models_draw_the_same_router_noise():
    from lm_core.stacked import stacked_layout
    from moma.depths import build_moma_model
    from tests.helpers import random_batch

    moma = parse_variant("mod_moe_2t2i", image_token_range=IMAGE_RANGE, router_noise=True)
    unrolled = build_moma_model(tiny_config(num_layers=4), moma, rngs=nnx.Rngs(0))
    structure = nnx.eval_shape(lambda: build_moma_model(tiny_config(num_layers=4, scan_layers=True), moma,
                                                        rngs=nnx.Rngs(0)))
    scanned = nnx.merge(nnx.graphdef(structure), stacked_layout(nnx.state(unrolled), len(structure.stacked_blocks)))
    batch = {k: jnp.asarray(v) for k, v in random_batch(1, batch=2, seq=16, packed=True).items()}
    out = [np.asarray(m(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                        rng=jax.random.key(3)).logits) for m in (unrolled, scanned)]
    np.testing.assert_allclose(out[1], out[0], atol=2e-5)


def test_variants_and_errors():
    assert parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE).groups == {"text": 4, "image": 4}
    assert parse_variant("moe_8x").groups == {"mixed": 8}
    assert parse_variant("mod_moe_1t1i", image_token_range=IMAGE_RANGE).mod and parse_variant("dense").is_dense
    assert parse_variant("mod_dense").mod
    for bad in ("moe_4t", "moe_0t4i", "moe_0x", "mod_", "sparse"):
        with pytest.raises(UserError, match=f"unknown MoMa variant '{bad}'"):
            parse_variant(bad)
    with pytest.raises(UserError, match="capacity_factor=0"):
        parse_variant("moe_8x", capacity_factor=0)
    with pytest.raises(UserError, match="image_token_range=.0, 0. is empty"):
        parse_variant("moe_4t4i")
    with pytest.raises(UserError, match="unknown MoMa option"):
        parse_variant("moe_8x", text_experts=2)
    with pytest.raises(UserError, match="expert axis of size 4"):
        check_fits_mesh(parse_variant("moe_2t2i", image_token_range=IMAGE_RANGE), 4)
    check_fits_mesh(parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE), 4)
    check_fits_mesh(parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE), 4)  # unrouted FFNs are replicated
    with pytest.raises(UserError, match="past vocab_size=64"):
        check_fits_model(parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE), tiny_config(vocab_size=64))


def test_active_ffn_flops_match_dense_and_mod_depths_match_the_paper():
    config = ModelConfig(vocab_size=65536, d_model=512, num_layers=8, num_heads=8, d_ff=2048, max_seq_len=4096)
    dense = ffn_layer_flops(config, parse_variant("dense"))
    assert dense == 2 * 3 * 512 * 2048
    # 1t1i: each token's modality FFN and its one-column gate
    assert ffn_layer_flops(config, parse_variant("moe_1t1i", image_token_range=IMAGE_RANGE)) == dense + 2 * 512
    # capacity 1: one expert per token on average, plus the token's router (2 * d * experts of its group)
    assert ffn_layer_flops(config, parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE)) == dense + 2 * 512 * 4
    assert ffn_layer_flops(config, parse_variant("moe_8x")) == dense + 2 * 512 * 8
    assert ffn_layer_flops(config, parse_variant("moe_8x", capacity_factor=2.0)) == 2 * dense + 2 * 512 * 8
    # the paper's compute-matched MoD depths: 90M dense l=8 -> 14, 435M l=24 -> 40
    assert compute_matched_mod_layers(config, parse_variant("mod_moe_4t4i", image_token_range=IMAGE_RANGE),
                                      4096) == 14
    config_435m = config.replace(d_model=1024, num_layers=24, num_heads=16, d_ff=4096)
    assert compute_matched_mod_layers(config_435m, parse_variant("mod_dense"), 4096) == 40
    # static slots: two modality groups each sized for the whole batch compute 2x; a 60% bound at a 50/50 mix 1.2x
    assert executed_expert_overhead(parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE)) == 2.0
    assert executed_expert_overhead(parse_variant("moe_8x")) == 1.0
    bounded = parse_variant("moe_4t4i", image_token_range=IMAGE_RANGE, max_text_fraction=0.6,
                            max_image_fraction=0.6)
    assert executed_expert_overhead(bounded) == pytest.approx(1.2)


def test_a_batch_beyond_the_slot_bound_is_clipped_and_reported_in_the_loss_metrics():
    from moma.depths import build_moma_model
    from moma.losses import mixed_modal_loss
    from moma.mixed_modal import MixedVocab

    vocab = MixedVocab(text_vocab_size=94, codebook_size=32, vocab_size=128)  # image codes 94..125
    tokens = jnp.array([[5, 100, 7, 120, 9, 101], [110, 3, 111, 4, 112, 102]])  # 7 image codes of 12
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones((2, 6))}
    overflows = {}
    for bound, groups in ((1.0, 1), (0.2, 1), (0.4, 1), (0.4, 2), (0.2, 2)):
        moma = parse_variant("moe_2t2i", image_token_range=(94, 126), max_image_fraction=bound,
                             routing_groups=groups)
        model = build_moma_model(tiny_config(), moma, rngs=nnx.Rngs(0))
        _, metrics = mixed_modal_loss(model, batch, vocab=vocab)
        row = {name: float(value) for name, value in metrics.items()}  # what the trainer logs of them
        overflows[bound, groups] = row["slot_overflow"]
        if (bound, groups) == (1.0, 1):  # every layer: budgets ceil(7/2) = 4 for 7 image, ceil(5/2) = 3 for 5 text
            assert row["image_experts_per_token"] == pytest.approx(8 / 7)
            assert row["text_experts_per_token"] == pytest.approx(6 / 5)
            assert 0 < row["image_routed_fraction"] <= 1 and 0 < row["text_routed_fraction"] <= 1
    # One group: 7 image tokens over 2 experts, budget ceil(7/2) = 4 each; a 0.2 bound gives ceil(0.2 * 12 / 2) = 2
    # slots (half the budget clipped), 0.4 gives 3 (a quarter). Two groups (one row each, 3 and 4 image tokens):
    # budgets 2 and 2; a 0.4 bound gives ceil(0.4 * 6 / 2) = 2 slots per group (nothing clipped), 0.2 gives 1.
    assert overflows == {(1.0, 1): 0.0, (0.2, 1): pytest.approx(0.5), (0.4, 1): pytest.approx(0.25),
                         (0.4, 2): 0.0, (0.2, 2): pytest.approx(0.5)}


def test_mod_layers_keep_unbounded_expert_slots():
    # A MoD layer's FFN sees whichever tokens its router picked, so the batch-mix bounds cannot apply there.
    from moma.depths import build_moma_model

    moma = parse_variant("mod_moe_2t2i", image_token_range=IMAGE_RANGE, max_text_fraction=0.3,
                         max_image_fraction=0.5)
    model = build_moma_model(tiny_config(), moma, rngs=nnx.Rngs(0))
    mod_groups, plain_groups = model.blocks[0].block.ffn.groups, model.blocks[1].ffn.groups
    assert (mod_groups["text"].router.max_fraction, mod_groups["image"].router.max_fraction) == (1.0, 1.0)
    assert (plain_groups["text"].router.max_fraction, plain_groups["image"].router.max_fraction) == (0.3, 0.5)


def test_routing_statistics_are_logged_as_layer_means():
    from moma.losses import routing_layer_means

    aux = ({"text_routed_fraction": jnp.array(0.5), "text_expert_load": jnp.array([0.2, 0.8]),
            "mod_selected_fraction": jnp.array(0.25)},
           {"text_routed_fraction": jnp.array(0.7), "text_experts_per_token": jnp.array(1.0)})
    means = {name: float(value) for name, value in routing_layer_means(aux).items()}
    # per-expert vectors are not step metrics; each scalar is averaged over the layers that report it
    assert means == {"text_routed_fraction": pytest.approx(0.6), "mod_selected_fraction": 0.25,
                     "text_experts_per_token": 1.0}
