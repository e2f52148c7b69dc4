"""Scanned layers (ModelConfig.scan_layers) and remat policies (ModelConfig.remat) compute the unrolled model.

scan == unrolled for logits, per-layer K,V, gradients, injected K,V, decoding and MoMa's period-2 MoD stacks (the
scanned model's parameters are the unrolled model's, stacked: lm_core.stacked converts between the layouts); every
remat policy gives the same loss and gradients; "ffn_only" keeps attention out of the recomputation; checkpoints
move between remat settings but not between layer layouts or models; the config validates both fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core import optim
from lm_core import train_step as ts
from lm_core.attention import LayerKV
from lm_core.checkpoint import Checkpointer, check_same_model
from lm_core.config import REMAT_POLICIES, ModelConfig
from lm_core.errors import UserError
from lm_core.kv_cache import init_cache
from lm_core.loss import cross_entropy, next_token_loss, output_layer_loss, with_aux_losses
from lm_core.model import Transformer, block_period
from lm_core.sharding import MeshConfig, make_mesh
from lm_core.stacked import stacked_layout, unrolled_layout
from moma.depths import MoDBlock, build_moma_model
from moma.variants import parse_variant
from tests.helpers import random_batch, tiny_config

ATOL = 1e-5
# Gradients of a scanned model against the unrolled one: the scan body is compiled as one program, whose fusions
# round differently from the unrolled ops, by ~1e-7 at these sizes; float32 agreement, tighter than ATOL.
GRAD_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
SMALL = dict(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=3)  # GQA: 4 query heads on 2 KV heads
IMAGE_RANGE = (96, 128)


def config(**changes) -> ModelConfig:
    return tiny_config(**{**SMALL, **changes})


def pair(**changes) -> tuple[Transformer, Transformer]:
    """(unrolled, scanned) models with the same parameters (same seed)."""
    return (Transformer(config(**changes), rngs=nnx.Rngs(0)),
            Transformer(config(**changes, scan_layers=True), rngs=nnx.Rngs(0)))


def batch_of(packed: bool, seed: int = 0, batch: int = 2, seq: int = 12) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in random_batch(seed, batch=batch, seq=seq, packed=packed).items()}


def split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(got, want, atol: float = ATOL, rtol: float = 0.0) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()  # same parameter tree (names and structure)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=atol, rtol=rtol, err_msg=name)


def loss_and_grads(model, batch, loss_fn=next_token_loss):
    graphdef, params, rest = split(model)
    (value, _), grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch), has_aux=True)(
        params)
    return value, grads


def primitive_counts(closed_jaxpr, names: tuple[str, ...]) -> dict[str, int]:
    """How often each primitive occurs in a jaxpr, sub-jaxprs (scan bodies, remat, custom rules) included."""
    counts = dict.fromkeys(names, 0)

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in counts:
                counts[eqn.primitive.name] += 1
            for value in eqn.params.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, jax.extend.core.ClosedJaxpr):
                        walk(item.jaxpr)
                    elif isinstance(item, jax.extend.core.Jaxpr):
                        walk(item)

    walk(closed_jaxpr.jaxpr)
    return counts


def scan_lengths(model, tokens, **kwargs) -> list[int]:
    """The `length` of every top-level scan in the model's forward jaxpr."""
    graphdef, params, rest = split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p, rest).hidden_states(tokens, **kwargs))(params)
    return [eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]


# --- 1. scan == unrolled -------------------------------------------------------------------------------------------

def test_scanned_forward_is_one_scan_over_the_layers():
    unrolled, scanned = pair()
    tokens = batch_of(False)["inputs"]
    assert scan_lengths(unrolled, tokens) == []
    assert scan_lengths(scanned, tokens) == [3]  # one scan, one step per layer
    # the same seed gives the same values, stacked along a leading "layers" axis
    stacked = nnx.state(scanned, nnx.Param)
    assert stacked["stacked_blocks"][0]["attention"]["query_proj"].logical_axes[0] == "layers"
    assert len(stacked["stacked_blocks"]) == 1 and "blocks" not in stacked
    assert_trees_close(unrolled_layout(stacked), nnx.state(unrolled, nnx.Param), atol=0.0)
    assert_trees_close(stacked_layout(nnx.state(unrolled, nnx.Param), 1), stacked, atol=0.0)
    # return_kv=False: the scan collects no K,V (fewer scan outputs) and none come back
    graphdef, params, rest = split(scanned)

    def outputs(return_kv):
        jaxpr, shapes = jax.make_jaxpr(
            lambda p: nnx.merge(graphdef, p, rest).hidden_states(tokens, return_kv=return_kv), return_shape=True)(
            params)
        return next(len(e.outvars) for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"), len(shapes[2])

    assert outputs(True) == (outputs(False)[0] + 2, 3)  # the scan also stacks keys and values; 3 layers' K,V
    assert outputs(False)[1] == 0


# The scanned side of each case also runs under one of the remat policies (the unrolled reference never does), so
# with test_every_remat_policy_... every policy is checked scanned and unrolled against unrolled remat="none".
@pytest.mark.parametrize("changes,packed,remat", [
    (dict(num_kv_heads=4), False, "none"),  # plain multi-head attention, one document per row
    (dict(qk_norm=True), True, "full"),  # GQA + QK-norm, two documents per row
    (dict(norm_placement="swin"), True, "dots_saveable"),
    (dict(tie_embeddings=False), True, "dots_with_no_batch_dims_saveable"),
], ids=["plain", "gqa_qk_norm_packed", "swin_packed", "untied_packed"])
def test_scan_equals_unrolled_logits_kv_and_gradients(changes, packed, remat):
    batch = batch_of(packed)

    def loss_fn(model, batch):
        out = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                    return_kv=True)
        return cross_entropy(out.logits, batch["targets"], batch["loss_mask"])[0], (out.logits, out.kv)

    unrolled = Transformer(config(**changes), rngs=nnx.Rngs(0))
    scanned = Transformer(config(**changes, scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
    results = []
    for model in (unrolled, scanned):
        graphdef, params, rest = split(model)
        (value, (logits, kv)), grads = jax.value_and_grad(
            lambda p, g=graphdef, r=rest: loss_fn(nnx.merge(g, p, r), batch), has_aux=True)(params)
        results.append((value, logits, kv, grads))
    (value_u, logits_u, kv_u, grads_u), (value_s, logits_s, kv_s, grads_s) = results
    np.testing.assert_allclose(logits_s, logits_u, atol=ATOL)
    np.testing.assert_allclose(value_s, value_u, atol=ATOL)
    assert len(kv_s) == len(kv_u) == 3
    for layer, (mine, theirs) in enumerate(zip(kv_s, kv_u, strict=True)):
        assert mine.keys.shape == theirs.keys.shape == (2, 12, config(**changes).num_kv_heads, 8)
        np.testing.assert_allclose(mine.keys, theirs.keys, atol=ATOL, err_msg=f"keys of layer {layer}")
        np.testing.assert_allclose(mine.values, theirs.values, atol=ATOL, err_msg=f"values of layer {layer}")
    assert_trees_close(unrolled_layout(grads_s), grads_u, **GRAD_TOLERANCE)
    assert all(np.abs(g).sum() > 0 for name, g in flat(grads_u).items() if "blocks" in name)


# --- 2. injected K,V ------------------------------------------------------------------------------------------------

def test_injected_kv_with_scan_equals_unrolled():
    unrolled, scanned = pair(qk_norm=True)
    batch = batch_of(True)
    kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    out = scanned(batch["inputs"], **kwargs, return_kv=True)
    graphdef, params, rest = split(scanned)
    inject = jax.jit(lambda kv: nnx.merge(graphdef, params, rest)(batch["inputs"], **kwargs, injected_kv=kv).logits)
    injected = inject(out.kv)
    np.testing.assert_allclose(injected, out.logits, atol=ATOL)
    np.testing.assert_allclose(injected, unrolled(batch["inputs"], **kwargs).logits, atol=ATOL)
    # different K,V per layer reach the layer they were given for: scan and unrolled agree, and it matters
    perturbed = tuple(LayerKV(kv.keys + 0.5 * i, kv.values - 0.25 * i) for i, kv in enumerate(out.kv))
    got = inject(perturbed)
    np.testing.assert_allclose(got, unrolled(batch["inputs"], **kwargs, injected_kv=perturbed).logits, atol=ATOL)
    assert not np.allclose(got, out.logits, atol=1e-3)


# --- 3. remat policies -----------------------------------------------------------------------------------------------

def test_every_remat_policy_with_and_without_scan_gives_the_same_loss_and_gradients():
    # Scanned "none", "full", "dots_saveable" and "dots_with_no_batch_dims_saveable" are the scanned sides of
    # test_scan_equals_unrolled_logits_kv_and_gradients (one scan compile each); here every policy unrolled and
    # scanned "ffn_only", against unrolled remat="none", through next_token_loss (return_kv=False). Unrolled, the
    # ops run one by one and remat reruns the very same ops on the same inputs: bit-identical loss and gradients.
    batch = batch_of(True, seed=1)
    reference_loss, reference_grads = loss_and_grads(Transformer(config(), rngs=nnx.Rngs(0)), batch)
    assert all(np.abs(g).sum() > 0 for g in flat(reference_grads).values())  # not a comparison of zeros
    policies = [p for p in REMAT_POLICIES if p != "none"]
    assert len(policies) == 4
    for policy, scan in [(policy, False) for policy in policies] + [("ffn_only", True)]:
        model = Transformer(config(remat=policy, scan_layers=scan), rngs=nnx.Rngs(0))
        value, grads = loss_and_grads(model, batch)
        tolerance = GRAD_TOLERANCE if scan else dict(rtol=0.0, atol=0.0)
        np.testing.assert_allclose(value, reference_loss, **tolerance, err_msg=f"{policy} scan={scan}")
        assert_trees_close(unrolled_layout(grads), reference_grads, **tolerance)


# --- 4. ffn_only keeps attention out of the backward pass --------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_ffn_only_does_not_recompute_attention(scan):
    # Criterion: the number of `exp` ops in the jaxpr of jax.grad(loss). Inside a block, exp occurs only in the
    # attention softmax (SwiGLU uses logistic, RMSNorm rsqrt); the loss's logsumexp is the same in every variant.
    # Without remat the count is the forward's; "full" recomputes the softmax in the backward pass (more exps:
    # the criterion does see recomputation); "ffn_only" must recompute the FFN but not the attention.
    batch = batch_of(False, seq=8)

    def counts(policy):
        graphdef, params, rest = split(Transformer(config(num_layers=2, remat=policy, scan_layers=scan),
                                                   rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: next_token_loss(nnx.merge(graphdef, p, rest), batch)[0]))(params)
        return primitive_counts(jaxpr, ("exp", "logistic"))

    none, full, saved = counts("none"), counts("full"), counts("ffn_only")
    assert full["exp"] > none["exp"] and full["logistic"] > none["logistic"]
    assert saved["logistic"] > none["logistic"], "ffn_only should still rematerialise the FFN"
    assert saved["exp"] == none["exp"], (
        f"attention softmax recomputed under ffn_only: exp ops none={none['exp']}, "
        f"full={full['exp']}, ffn_only={saved['exp']}")


# --- 5. MoMa: period-2 MoD stacks -------------------------------------------------------------------------------------

def test_block_period_and_scanned_mod_moma_equals_unrolled():
    assert block_period(nnx.eval_shape(lambda: Transformer(config(num_layers=4), rngs=nnx.Rngs(0))).blocks) == 1
    moma = parse_variant("mod_moe_4t4i", image_token_range=IMAGE_RANGE)

    def build(scan):
        return build_moma_model(config(num_layers=4, scan_layers=scan), moma, rngs=nnx.Rngs(0))

    # the unrolled model's parameters, stacked in pairs of layers into the scanned structure (built once, not twice)
    unrolled = build(False)
    scanned = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build(True))), stacked_layout(nnx.state(unrolled), 2))
    assert not unrolled.config.scan_layers and scanned.config.scan_layers
    assert [isinstance(scanned.block(i), MoDBlock) for i in range(4)] == [True, False, True, False]
    assert block_period(unrolled.blocks) == len(scanned.stacked_blocks) == 2
    batch = batch_of(True, seed=2, seq=8)
    batch["segment_ids"] = batch["segment_ids"].at[0, -3:].set(0)  # some padding
    batch["loss_mask"] = batch["loss_mask"].at[0, -4:].set(0.0)
    assert scan_lengths(scanned, batch["inputs"]) == [2]  # two steps of (MoD block, MoE block)

    def loss_fn(model, batch):  # next_token_loss, keeping the per-layer aux
        states = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"], return_kv=False)
        loss, metrics = output_layer_loss(model, states.hidden, batch["targets"], batch["loss_mask"])
        return with_aux_losses(loss, metrics, states.aux)[0], states.aux

    results = []
    for model in (unrolled, scanned):  # jitted: op-by-op MoE routing is slower than one compile
        graphdef, params, rest = split(model)
        (value, aux), grads = jax.jit(jax.value_and_grad(
            lambda p, g=graphdef, r=rest: loss_fn(nnx.merge(g, p, r), batch), has_aux=True))(params)
        results.append((value, aux, grads))
    (value_u, aux_u, grads_u), (value_s, aux_s, grads_s) = results
    np.testing.assert_allclose(value_s, value_u, atol=ATOL)
    assert len(aux_s) == 4 and [set(a) for a in aux_s] == [set(a) for a in aux_u]
    assert "mod_selected_fraction" in aux_s[0] and "mod_selected_fraction" not in aux_s[1]
    for mine, theirs in zip(aux_s, aux_u, strict=True):
        for name in theirs:
            np.testing.assert_allclose(mine[name], theirs[name], atol=ATOL, err_msg=name)
    assert_trees_close(unrolled_layout(grads_s), grads_u)
    assert np.abs(flat(grads_u)["['blocks'][2]['router']['weight'].value"]).sum() > 0  # the second MoD layer's router


# --- 6. decoding ---------------------------------------------------------------------------------------------------

def test_cached_decode_of_a_scanned_model_matches_its_full_forward():
    model = Transformer(config(qk_norm=True, scan_layers=True), rngs=nnx.Rngs(0))
    batch = batch_of(True)
    tokens, positions, segment_ids = batch["inputs"], batch["positions"], batch["segment_ids"]
    out = model(tokens, positions=positions, segment_ids=segment_ids, return_kv=True)  # scanned
    full = out.logits
    prefill = 8
    sl = slice(0, prefill)
    reference = model(tokens[:, sl], positions=positions[:, sl], segment_ids=segment_ids[:, sl],
                      cache=init_cache(model.config, 2, 16))  # cached calls run unrolled
    np.testing.assert_allclose(reference.logits, full[:, sl], atol=ATOL)
    # the scanned K,V make the same cache (Transformer.prefill = hidden_states + cache_from_kv)
    scanned_cache = model.cache_from_kv([LayerKV(kv.keys[:, sl], kv.values[:, sl]) for kv in out.kv],
                                        positions[:, sl], segment_ids[:, sl], 16)
    for mine, theirs in zip(jax.tree.leaves(scanned_cache), jax.tree.leaves(reference.cache), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=ATOL)
    cache = reference.cache
    step_logits = []
    for t in range(prefill, tokens.shape[1]):
        step = model(tokens[:, t:t + 1], positions=positions[:, t:t + 1], segment_ids=segment_ids[:, t:t + 1],
                     cache=cache)
        step_logits.append(step.logits)
        cache = step.cache
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full[:, prefill:], atol=ATOL)
    assert int(cache.index) == tokens.shape[1]


# --- 7. checkpoints ---------------------------------------------------------------------------------------------------

def in_layout(tree, convert):
    """`convert` (lm_core.stacked.unrolled_layout / stacked_layout) applied to every model-shaped state in a
    train state: the parameters and AdamW's moments."""
    return jax.tree.map(lambda x: convert(x) if isinstance(x, nnx.State) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.State))


def test_checkpoints_resume_under_another_remat_but_not_another_layer_layout(tmp_path):
    # The trainer's resume path (lm_core.trainer.train) without its data pipeline: a state after one train step
    # (train_step.make_train_step), saved unrolled and (converted) scanned with the trainer's meta; then
    # check_same_model, an orbax restore into the layout of the same model with remat="full", one more step each.
    unrolled_config = config(num_layers=2)
    scanned_config = unrolled_config.replace(scan_layers=True)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0, learning_rate=1e-2, total_steps=10))

    def setup(model_config):
        graphdef, abstract, shardings = ts.train_state_layout(lambda: Transformer(model_config, rngs=nnx.Rngs(0)),
                                                              optimizer, mesh)
        return abstract, shardings, ts.make_train_step(graphdef, next_token_loss, optimizer, mesh, shardings)

    _, shardings, first_step = setup(unrolled_config)
    params = nnx.state(Transformer(unrolled_config, rngs=nnx.Rngs(0)), nnx.Param)
    state = jax.device_put(ts.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                                         jax.random.key_data(jax.random.key(0))), shardings)
    state, _ = first_step(state, batch_of(True, seed=3))
    saved = {"unrolled": state, "scanned": in_layout(state, lambda x: stacked_layout(x, 1))}
    final = {}
    for name, model_config in (("unrolled", unrolled_config), ("scanned", scanned_config)):
        checkpointer = Checkpointer(tmp_path / name / "checkpoints")
        checkpointer.save(1, saved[name], {"position": 1}, {"model": model_config.to_dict()}, wait=True)
        meta = checkpointer.read_meta(1)
        rematted = model_config.replace(remat="full")
        check_same_model(meta, rematted, tmp_path / name)  # an execution field does not make another model
        other_layout = model_config.replace(scan_layers=not model_config.scan_layers)
        with pytest.raises(UserError, match=f"scan_layers: checkpoint {model_config.scan_layers} vs config "
                                            f"{not model_config.scan_layers}.*stacked"):
            check_same_model(meta, other_layout, tmp_path / name)
        with pytest.raises(UserError, match="num_layers: checkpoint 2 vs config 3"):
            check_same_model(meta, rematted.replace(num_layers=3), tmp_path / name)
        abstract, _, next_step = setup(rematted)
        restored = checkpointer.restore(1, abstract).state
        checkpointer.close()
        assert int(restored.step) == 1
        assert_trees_close(restored.params, saved[name].params, atol=0.0)
        final[name] = next_step(restored, batch_of(True, seed=4))
    (scanned, scanned_metrics), (unrolled, unrolled_metrics) = final["scanned"], final["unrolled"]
    assert float(scanned_metrics["loss"]) == pytest.approx(float(unrolled_metrics["loss"]), abs=ATOL)
    assert_trees_close(in_layout(scanned, unrolled_layout), unrolled, atol=1e-5, rtol=1e-4)
    assert any(not np.allclose(v, flat(state.params)[k]) for k, v in flat(unrolled.params).items())  # it trained


# --- 8. config validation ---------------------------------------------------------------------------------------------

def test_remat_and_scan_layers_validation():
    assert ModelConfig(remat=True).remat == "full"
    assert ModelConfig(remat=False).remat == "none"
    assert ModelConfig().remat == "none" and ModelConfig().scan_layers is False
    with pytest.raises(UserError) as error:
        ModelConfig(remat="bogus")
    assert "remat='bogus'" in str(error.value)
    assert all(policy in str(error.value) for policy in REMAT_POLICIES)
    with pytest.raises(UserError, match="scan_layers='yes'"):
        ModelConfig(scan_layers="yes")
    assert ModelConfig.from_dict(ModelConfig(remat=True, scan_layers=True).to_dict()).remat == "full"
