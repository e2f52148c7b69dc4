"""MoMa auxiliary routers: causal routing is per token, perfect aux routers reproduce expert choice, BCE training."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.errors import UserError
from lm_core.stacked import stacked_layout
from moma import aux_routers as ar
from moma import routing as rt
from moma.depths import build_moma_model
from moma.variants import parse_variant
from tests.helpers import random_batch, tiny_config

IMAGE_RANGE = (96, 128)


def routed_model(variant: str, seed: int = 0, **changes):
    config = tiny_config(**changes)
    model = build_moma_model(config, parse_variant(variant, image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(seed))
    ar.attach_aux_routers(model, config, rngs=nnx.Rngs(seed + 100))
    return model


def batch_of(seed: int, batch: int = 4, seq: int = 16) -> dict[str, jnp.ndarray]:
    return {k: jnp.asarray(v) for k, v in random_batch(seed, batch=batch, seq=seq, packed=True).items()}


CAUSAL = rt.routing_mode(rt.CAUSAL)
ORACLE = rt.routing_mode(rt.ORACLE)


@functools.partial(jax.jit, static_argnums=(0, 5))
def forward(graphdef, state, inputs, positions, segment_ids, mode):
    return nnx.merge(graphdef, state)(inputs, positions=positions, segment_ids=segment_ids, routing=mode).logits


def logits_of(model, batch, mode: rt.RoutingMode | None = None) -> np.ndarray:
    """The model's logits under jit with routing `mode` (static: one compile per mode and shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(forward(graphdef, state, batch["inputs"], batch["positions"], batch["segment_ids"], mode))


def test_first_come_slots_by_hand():
    decisions = jnp.array([False, True, True, False, True, True])
    index, valid = rt.first_come_slots(decisions, 3)
    np.testing.assert_array_equal(index, [1, 2, 4])  # the earliest three, in token order
    np.testing.assert_array_equal(valid, [True, True, True])
    index, valid = rt.first_come_slots(jnp.array([False, True, False]), 2)
    assert int(index[0]) == 1 and valid.tolist() == [True, False]
    # [tokens, experts] decisions -> per-expert slots, and back to the same [tokens, experts] mask
    decisions = jnp.array([[True, False], [True, True], [False, True]])
    index, valid = rt.causal_expert_slots(decisions, 3)
    np.testing.assert_array_equal(rt.selection_targets(index, valid, 3), decisions)


def test_first_come_slots_and_targets_per_row_by_hand():
    # rows as routing groups with one chooser (a MoD layer): row 0's demand never takes row 1's slots
    decisions = jnp.array([[True, False, True, True], [False, False, False, True]])[..., None]
    scores = jnp.linspace(0.1, 0.8, 8).reshape(2, 4, 1)
    routing = rt.causal_route(scores, decisions, 2)
    index, valid = routing.token_index[:, 0], routing.valid[:, 0]
    np.testing.assert_array_equal(index[0], [0, 2])
    assert int(index[1, 0]) == 3 and valid.tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(routing.gate[:, 0], [[0.1, 0.3], [0.8, 0.0]], rtol=1e-6)  # scores gate, 0 if invalid
    assert routing.budget.tolist() == [3.0, 1.0]  # each row's demand
    expected = np.array([[True, False, True, False], [False, False, False, True]])
    np.testing.assert_array_equal(rt.group_selection_targets(routing.token_index, routing.valid, 4)[..., 0],
                                  expected)


def causal_mod_block():
    """A MoD block whose main router scores sigmoid(10 · x0) and whose aux router says yes iff x0 > 0."""
    from lm_core.model import Block
    from moma.depths import MoDBlock
    from moma.experts import moma_ffn_factory

    config = tiny_config()
    block = MoDBlock(Block(config, 0, moma_ffn_factory(parse_variant("dense")), rngs=nnx.Rngs(0)), config, 0.25,
                     rngs=nnx.Rngs(1))
    block.router.weight[...] = jnp.zeros((64, 1)).at[0, 0].set(10.0)
    aux = block.router.aux_router = rt.AuxRouter(config, 1, rngs=nnx.Rngs(2))
    aux.w1[...] = jnp.zeros_like(aux.w1[...]).at[0, :].set(1.0)  # logit ∝ silu(x0)
    aux.w2[...] = jnp.ones_like(aux.w2[...])
    return block


MOD_X0 = np.array([[0.1, -0.2, 0.5, 0.0, 0.3, -0.1, 0.2, 0.4],
                   [-0.5, 0.05, -0.3, 0.15, -0.4, 0.35, 0.25, -0.1]], np.float32)


def test_causal_mod_fills_each_rows_slots_first_come():
    block = causal_mod_block()
    x = jax.random.normal(jax.random.key(0), (2, 8, 64)).at[..., 0].set(MOD_X0)
    real = jnp.ones((2, 8), bool)
    # expert choice: each row's top 2 by main score (row 0: 2, 7; row 1: 5, 6), aux stats against those targets
    selection, stats = block.select(x, real)
    np.testing.assert_array_equal(selection.index, [[2, 7], [5, 6]])
    assert float(stats["mod_aux_router_pairs"]) == 16 and float(stats["mod_aux_router_selected"]) == 4
    assert float(stats["mod_aux_router_recall"]) == 1.0  # x0 > 0 covers every row's top 2
    assert float(stats["mod_aux_router_accuracy"]) == pytest.approx(11 / 16)  # false yes: 0, 4, 6 | 1, 3
    # causal, 2 slots per row: the first two tokens with x0 > 0 of each row (row 0: 0, 2, 4, 6, 7; row 1: 1, 3, 5, 6)
    quarter = rt.routing_mode(rt.CAUSAL, causal_capacity=0.25)
    selection, stats = block.select(x, real, quarter)
    np.testing.assert_array_equal(selection.index, [[0, 2], [1, 3]])
    assert selection.valid.all() and float(stats["mod_causal_overflow"]) == pytest.approx(5 / 9)
    weights = 1 / (1 + np.exp(-10 * MOD_X0[[0, 0, 1, 1], [0, 2, 1, 3]].astype(np.float64)))
    np.testing.assert_allclose(selection.weight.reshape(-1), weights, rtol=1e-6)  # the main router still gates
    # padding never decides; row 1's only real "yes" (token 1) gets a slot, the other slot is invalid
    selection, _ = block.select(x, real.at[1, 2:].set(False), quarter)
    assert int(selection.index[1, 0]) == 1 and selection.valid.tolist() == [[True, True], [True, False]]
    assert float(selection.weight[1, 1]) == 0.0


def test_aux_router_statistics_by_hand():
    logits = jnp.array([[2.0, -1.0], [-3.0, 1.0], [5.0, 5.0]])
    targets = jnp.array([[True, False], [True, True], [False, False]])
    eligible = jnp.array([True, True, False])  # the third token is another modality's: not counted
    stats = rt.aux_router_statistics("text", logits, targets, eligible)
    assert float(stats["text_aux_router_accuracy"]) == pytest.approx(3 / 4)
    assert float(stats["text_aux_router_recall"]) == pytest.approx(2 / 3)
    bce = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log1p(np.exp(3.0)), np.log1p(np.exp(-1.0))])
    assert float(stats["text_aux_router_loss"]) == pytest.approx(bce, rel=1e-5)
    assert float(stats["text_aux_router_pairs"]) == 4 and float(stats["text_aux_router_selected"]) == 3


@pytest.mark.parametrize("variant", ["moe_4t4i", "mod_moe_2t2i"])
def test_causal_mode_makes_earlier_tokens_independent_of_later_ones(variant):
    model = routed_model(variant)
    batch = batch_of(0)
    cut = 10
    changed = dict(batch, inputs=batch["inputs"].at[:, cut:].set((batch["inputs"][:, cut:] + 37) % 128))

    before, after = logits_of(model, batch, CAUSAL), logits_of(model, changed, CAUSAL)
    np.testing.assert_allclose(after[:, :cut], before[:, :cut], atol=1e-5)
    assert np.abs(after[:, cut:] - before[:, cut:]).max() > 1e-2  # the change itself does matter

    # expert choice (the default): a top-k over the batch (MoD: the row) lets later tokens move it
    before, after = logits_of(model, batch), logits_of(model, changed)
    assert np.abs(after[:, :cut] - before[:, :cut]).max() > 1e-3


@pytest.mark.parametrize("variant", ["moe_4t4i", "moe_8x", "mod_moe_2t2i", "mod_dense"])
def test_aux_routers_forced_to_the_true_selections_reproduce_expert_choice(variant):
    model = routed_model(variant)
    batch = batch_of(1)
    expert_choice = logits_of(model, batch)
    # the causal dispatch path, decisions = expert choice's selections
    np.testing.assert_allclose(logits_of(model, batch, ORACLE), expert_choice, atol=2e-5)


def test_causal_moe_decodes_token_by_token_like_its_full_forward():
    """What the aux routers are for: with causal routing a MoE model runs with a KV cache, one token at a time."""
    from lm_core.kv_cache import init_cache

    model = routed_model("moe_4t4i")
    batch = batch_of(3, batch=2, seq=12)
    full = logits_of(model, batch, CAUSAL)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, segment_ids, cache):
        out = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                         routing=CAUSAL)
        return out.logits, out.cache

    cache = init_cache(model.config, 2, 16)
    pieces = []
    for start, stop in [(0, 4), *((t, t + 1) for t in range(4, 12))]:
        logits, cache = step(state, batch["inputs"][:, start:stop], batch["positions"][:, start:stop],
                             batch["segment_ids"][:, start:stop], cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5)


def test_causal_routing_expert_parallel_equals_single_device():
    from lm_core import train_step as ts
    from lm_core.sharding import MeshConfig, make_mesh

    model = routed_model("mod_moe_4t4i")
    batch = batch_of(2, batch=8)
    expected = logits_of(model, batch, CAUSAL)
    mesh = make_mesh(MeshConfig(2, 1, 1, 4), jax.devices()[:8])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = ts.param_shardings(mesh, params)

    def forward(params, batch):
        return nnx.merge(graphdef, params, rest)(batch["inputs"], positions=batch["positions"],
                                                 segment_ids=batch["segment_ids"], routing=CAUSAL).logits

    with jax.set_mesh(mesh):
        params = jax.device_put(params, shardings)
        logits = jax.jit(forward, in_shardings=(shardings, ts.batch_shardings(mesh, batch)))(params, batch)
    assert params["blocks"][0]["block"]["ffn"]["groups"]["text"]["up"][...].sharding.spec[0] == "expert"
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5)


def test_causal_capacity_bounds_slots_first_come():
    model = routed_model("moe_4t4i", num_layers=1)
    group = model.blocks[0].ffn.groups["text"]
    x = jax.random.normal(jax.random.key(0), (1, 16, 64))  # one routing group
    aux = group.router.aux_router
    aux.w2[...] = jnp.full_like(aux.w2[...], 0.0).at[:, 0].set(1.0)
    aux.w1[...] = jnp.zeros_like(aux.w1[...]).at[0, :].set(1.0)  # logit ∝ silu(x0)
    eligible = jnp.ones((1, 16), bool)
    quarter = rt.routing_mode(rt.CAUSAL, causal_capacity=0.25)  # 4 slots per expert
    routing = jax.tree.map(lambda a: a[0], group.router(x, eligible, quarter))
    x = x[0]
    wanted = np.flatnonzero(np.asarray(jax.nn.silu(x[:, 0])) > 0)
    kept = np.asarray(routing.token_index[0])[np.asarray(routing.valid[0])]
    np.testing.assert_array_equal(kept, wanted[:4])  # expert 0 keeps the earliest four that chose it
    assert float(routing.budget) == len(wanted) and not routing.valid[1:].any()  # logit 0 elsewhere: not > 0.5
    scores = jax.nn.sigmoid(x @ group.router.weight[...])
    np.testing.assert_allclose(routing.gate[0, :4], scores[wanted[:4], 0], rtol=1e-6)


def test_bce_training_learns_the_selections_and_leaves_the_main_model_alone():
    model = routed_model("mod_moe_4t4i")
    main_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(ar.AUX_ROUTER_PARAMS))))
    aux_before = jax.tree.map(np.asarray, nnx.state(model, ar.AUX_ROUTER_PARAMS))
    batches = [batch_of(seed, batch=8) for seed in range(2)]
    history = list(ar.train_aux_routers(model, itertools.cycle(batches), 60, learning_rate=1e-2))
    first, last = history[0], history[-1]
    assert last["aux_router_bce"] < 0.6 * first["aux_router_bce"], (first, last)
    # chance here is the majority class, "never selected": 1 - (share of pairs expert choice selects)
    results = ar.evaluate_routing(model, batches, IMAGE_RANGE)
    for label in ("aux_router", "text_aux_router", "image_aux_router", "mod_aux_router"):
        share = results[f"{label}_selected_share"]
        chance = max(share, 1 - share)
        assert results[f"{label}_accuracy"] > chance + 0.5 * (1 - chance), (label, results)
    assert results["aux_router_accuracy"] > 0.9 and results["aux_router_recall"] > 0.7, results
    assert np.isfinite(results["causal_loss"]) and np.isfinite(results["noncausal_loss"])
    assert {"causal_text_loss", "causal_image_loss", "noncausal_text_loss", "noncausal_image_loss"} <= set(results)
    assert 0.1 < results["causal_mod_selected_fraction"] < 0.45  # the MoD layers pass about c_d = 0.25 causally
    assert results["causal_mod_causal_overflow"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, main_before,
                 jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(ar.AUX_ROUTER_PARAMS)))))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), aux_before,
                         nnx.state(model, ar.AUX_ROUTER_PARAMS))
    assert all(jax.tree.leaves(moved))


def test_errors():
    config = tiny_config()
    for variant in ("dense", "moe_1t1i"):  # nothing decided batch-wide: nothing to learn
        model = build_moma_model(config, parse_variant(variant, image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(0))
        assert ar.attach_aux_routers(model, config, rngs=nnx.Rngs(1)) == 0
        with pytest.raises(UserError, match="makes no routing decision"):
            ar.check_routable(model, variant)
    model = build_moma_model(config, parse_variant("moe_2t2i", image_token_range=IMAGE_RANGE), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="needs auxiliary routers"):
        ar.causal_mode(model)
    with pytest.raises(UserError, match="causal routing needs auxiliary routers"):  # the model call says it too
        logits_of(model, batch_of(0), CAUSAL)
    with pytest.raises(UserError, match="routing mode 'greedy' is unknown"):
        rt.routing_mode("greedy")
    with pytest.raises(UserError, match="causal_capacity=0"):
        rt.routing_mode(rt.EXPERT_CHOICE, causal_capacity=0)


# --- the entrypoint: experiments.moma.train_aux_routers -------------------------------------------------------------


def tiny_run_config(variant: str, vq_dir):
    """A seconds-sized MoMa run: byte captions, 8x8 images -> 4x4 codes of a 16-code VQ trained for 3 steps."""
    from experiments.configs import moma_tiny

    config = moma_tiny.get_config("demo")
    config.moma.variant = variant
    config.model.update(dict(vocab_size=288, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64,
                             max_seq_len=64))
    config.data.update(dict(tokenizer="byte", seq_len=48, global_batch_size=8))
    config.steps, config.log_every, config.eval_every, config.eval_batches, config.checkpoint_every = 2, 1, 2, 1, 2
    config.optimizer.warmup_steps = 1
    config.moma.image_source = "builtin:64"
    config.moma.image_tokenizer.update(dict(dir=str(vq_dir), image_size=8, downsample=2, widths=(8,),
                                            codebook_size=16, code_dim=8, steps=3, batch_size=8))
    return config


@pytest.mark.slow
def test_entrypoint_trains_saves_reuses_and_refuses_bad_input(tmp_path):
    import json

    from experiments.moma.task import moma_task
    from experiments.moma.train_aux_routers import AuxRouterConfig, run
    from lm_core.trainer import train

    config = tiny_run_config("mod_moe_2t2i", tmp_path / "vq")
    workdir = tmp_path / "run"
    train(config, workdir, moma_task(config, workdir))
    results = run(AuxRouterConfig(steps=3, log_every=1), workdir)
    for key in ("aux_router_accuracy", "aux_router_recall", "causal_loss", "noncausal_loss", "causal_text_loss",
                "causal_image_loss", "noncausal_text_loss", "noncausal_image_loss", "mod_aux_router_accuracy",
                "text_aux_router_accuracy", "causal_mod_selected_fraction"):
        assert np.isfinite(results[key]), key
    saved = json.loads((workdir / "aux_routers" / "results.json").read_text())
    assert saved["causal_loss"] == results["causal_loss"] and saved["variant"] == "mod_moe_2t2i"
    assert len((workdir / "aux_routers" / "metrics.jsonl").read_text().splitlines()) == 3
    # a rerun reuses the saved routers: the same numbers without training again
    assert run(AuxRouterConfig(steps=3), workdir) == results
    with pytest.raises(UserError, match="other settings .steps: saved 3 vs now 4"):
        run(AuxRouterConfig(steps=4), workdir)

    with pytest.raises(UserError, match="has no config.json"):
        run(None, tmp_path / "empty")
    dense = tiny_run_config("moe_1t1i", tmp_path / "vq")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps(dense.to_dict()))
    with pytest.raises(UserError, match="'moe_1t1i' makes no routing decision"):
        run(None, tmp_path / "dense")
    with pytest.raises(UserError, match="steps=0"):
        AuxRouterConfig(steps=0)


@pytest.mark.slow
def test_entrypoint_bad_workdir_is_one_error_line_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "experiments.moma.train_aux_routers", f"--workdir={tmp_path}"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "has no config.json" in errors[0], result.stderr


@pytest.mark.parametrize("variant", ["moe_4t4i", "mod_moe_2t2i"])
def test_stacked_layers_get_stacked_aux_routers_and_route_like_unrolled(variant):
    # A scanned model keeps its blocks stacked (lm_core.stacked), so each routed module gets one aux router per
    # layer, stacked as well; with the unrolled model's parameters, stacked, every routing mode gives its logits.
    unrolled = routed_model(variant, num_layers=4)
    structure = nnx.eval_shape(lambda: routed_model(variant, num_layers=4, scan_layers=True))
    period = len(structure.stacked_blocks)
    assert period == (2 if variant.startswith("mod_") else 1)
    scanned = nnx.merge(nnx.graphdef(structure), stacked_layout(nnx.state(unrolled), period))
    routers = nnx.state(scanned, ar.AUX_ROUTER_PARAMS)
    assert all(leaf.shape[0] == 4 // period for leaf in jax.tree.leaves(routers))
    batch = batch_of(2)
    for mode in (rt.RoutingMode(), CAUSAL, ORACLE):
        np.testing.assert_allclose(logits_of(scanned, batch, mode), logits_of(unrolled, batch, mode), atol=2e-5,
                                   err_msg=mode.name)
