"""`ModelConfig.attention_impl`: every implementation computes what the plain formula (`reference`,
lm_core.attention.reference_attention) computes, logits and gradients.

xla_blocked and dot_product run on CPU directly; splash runs on CPU in Pallas interpret mode (the same kernel as
XLA ops) and is compiled, not run, for a TPU topology.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm_core.attention import resolve_attention_impl
from lm_core.attention_kernels import _attention_weights, _softmax_attention
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.hlo_flops import opaque_kernel_calls
from lm_core.kv_cache import init_cache
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, make_mesh
from lm_core.train_step import param_shardings
from tests.helpers import tiny_config

SEQ = 128  # splash tiles the sequence in blocks of >= 128
# GQA (8 query heads on 4 KV heads, tiny_config) with QK-norm; one layer keeps the compiles short
CHANGES = dict(qk_norm=True, max_seq_len=SEQ, num_layers=1)


def build(impl: str) -> Transformer:
    return Transformer(tiny_config(attention_impl=impl, **CHANGES), rngs=nnx.Rngs(0))


@functools.cache
def initial_state() -> nnx.State:
    """Random parameters of `build`'s shapes, drawn with numpy: compiling the model's own initialisation costs
    ~7 s of CPU, more than all the attention work here. Matrices ~ N(0, 1/fan_in), norm scales ~ 1."""
    rng = np.random.default_rng(0)

    def draw(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if len(leaf.shape) == 1:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) * leaf.shape[0] ** -0.5, leaf.dtype)

    return jax.tree.map(draw, nnx.split(nnx.eval_shape(lambda: build("xla_blocked")))[1])


def model(impl: str) -> Transformer:
    """The same parameters, run with attention `impl` (attention_impl only changes the static graph)."""
    return nnx.merge(nnx.split(nnx.eval_shape(lambda: build(impl)))[0], initial_state())


def packed_inputs(batch: int = 2, seq: int = SEQ, split: int = 50):
    """Two documents per row (segment ids 1 and 2), positions restarting at the second."""
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, 128)
    slots = jnp.arange(seq)
    segment_ids = jnp.broadcast_to(jnp.where(slots < split, 1, 2), (batch, seq)).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.where(slots < split, slots, slots - split), (batch, seq)).astype(jnp.int32)
    return tokens, positions, segment_ids


def logits_and_grads(impl: str):
    graphdef, state = nnx.split(model(impl))
    tokens, positions, segment_ids = packed_inputs()
    weights = jax.random.normal(jax.random.key(2), (2, SEQ, 128)) / (2 * SEQ)  # a per-token mean: O(1) loss

    @jax.jit
    def run(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids).logits
            return jnp.sum(logits * weights), logits
        return jax.grad(loss, has_aux=True)(state)

    grads, logits = run(state)
    return logits, grads


@pytest.fixture(scope="module")
def reference():
    return logits_and_grads("reference")


@pytest.mark.parametrize("impl", ["xla_blocked", "dot_product", "splash"])
def test_impl_matches_the_reference_formula_logits_and_grads(reference, impl):
    expected_logits, expected_grads = reference
    logits, grads = logits_and_grads(impl)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, expected_grads)


def test_splash_under_a_mesh_matches_the_reference(reference):
    # batch over data, heads over tensor: the kernel runs in a shard_map on each device's shard
    mesh = make_mesh(MeshConfig(2, 1, 2, 1), jax.devices()[:4])
    graphdef, state = nnx.split(model("splash"))
    tokens, positions, segment_ids = packed_inputs()
    run = jax.jit(lambda state: nnx.merge(graphdef, state)(tokens, positions=positions,
                                                             segment_ids=segment_ids).logits)
    with jax.set_mesh(mesh):
        text = run.lower(state).as_text()
        logits = run(state)
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(logits, reference[0], atol=1e-5)


@functools.cache
def full_forward_logits() -> jax.Array:
    """The reference formula's logits of the short packed batch the decode tests step through."""
    graphdef, state = nnx.split(model("reference"))
    tokens, positions, segment_ids = packed_inputs(seq=12, split=5)
    return jax.jit(lambda state: nnx.merge(graphdef, state)(tokens, positions=positions,
                                                             segment_ids=segment_ids).logits)(state)


@pytest.mark.parametrize("impl", ["reference", "xla_blocked", "dot_product", "splash"])
def test_cached_decode_matches_full_forward(impl):
    # splash falls back to dot_product for cached calls (prefill into a cache and 1-token steps)
    tokens, positions, segment_ids = packed_inputs(seq=12, split=5)
    full = full_forward_logits()
    graphdef, state = nnx.split(model(impl))

    @jax.jit
    def step(tokens, positions, segment_ids, cache):
        out = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids, cache=cache)
        return out.logits, out.cache

    prefill = 4
    logits, cache = step(tokens[:, :prefill], positions[:, :prefill], segment_ids[:, :prefill],
                         init_cache(tiny_config(**CHANGES), 2, 16))
    step_logits = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = step(tokens[:, t:t + 1], positions[:, t:t + 1], segment_ids[:, t:t + 1], cache)
        step_logits.append(logits)
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full, atol=1e-5)


# a dot whose operands are bf16 and whose result is f32: the MXU/CPU accumulates in f32
BF16_DOT_TO_F32 = re.compile(r"stablehlo\.dot_general[^\n]*\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> "
                             r"tensor<[^>]*xf32>")


def test_bf16_scores_accumulate_in_float32():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 2, 8, 16), jnp.bfloat16) for i in range(3))
    mask = jnp.tril(jnp.ones((1, 8, 8), bool))
    forward = jax.jit(_attention_weights).lower(q, k, mask).as_text()
    assert len(BF16_DOT_TO_F32.findall(forward)) == 1  # q·kᵀ

    def loss(q, k, v):
        return jnp.sum(_softmax_attention(q, k, v, mask).astype(jnp.float32))

    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert len(BF16_DOT_TO_F32.findall(backward)) == 2  # q·kᵀ again and dO·vᵀ (the score-shaped d_weights)
    # and numerically: closer to the float32 softmax than bf16-rounded scores would allow
    weights = jax.jit(_attention_weights)
    exact = weights(q.astype(jnp.float32), k.astype(jnp.float32), mask)
    np.testing.assert_allclose(weights(q, k, mask), exact, atol=1e-6)


def test_splash_needs_a_multiple_of_128_tokens():
    splash = model("splash")
    with pytest.raises(ValueError, match=r"multiple of 128, got seq=12"):
        jax.eval_shape(lambda tokens: splash(tokens).logits, packed_inputs(seq=12, split=5)[0])


def test_splash_compiles_for_tpu(monkeypatch):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file unless told otherwise; an AOT compile needs no TPU, so let other
    # processes (parallel test workers, a compile check) load it at the same time
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    topology = topologies.get_topology_desc("v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topology.devices).reshape(2, 1, 2, 1), ("data", "fsdp", "tensor", "expert"))
    config = ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                         d_ff=256, max_seq_len=256, dtype="bfloat16", attention_impl="splash")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          param_shardings(mesh, abstract))
    batch = jax.ShapeDtypeStruct((4, 256), jnp.int32,
                                 sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"), None)))

    def loss_and_grads(params, tokens, segment_ids):
        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids).logits ** 2)
        return jax.value_and_grad(loss)(params)

    with jax.set_mesh(mesh):
        lowered = jax.jit(loss_and_grads).lower(params, batch, batch)
        compiled = lowered.compile()
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not interpret mode
    assert compiled.memory_analysis() is not None
    # compile_check lists the kernel's calls apart (its FLOPs are invisible): per layer one forward, one dK/dV
    # and one dQ kernel
    calls = opaque_kernel_calls(compiled.as_text())
    assert sum(calls.values()) == 3 * config.num_layers and all(name.startswith("splash") for name in calls)


@pytest.mark.parametrize("impl,platform,expected", [
    ("auto", "cpu", "xla_blocked"), ("auto", "gpu", "dot_product"), ("auto", "cuda", "dot_product"),
    ("auto", "rocm", "dot_product"), ("auto", "tpu", "splash"), ("splash", "cpu", "splash"),
    ("dot_product", "tpu", "dot_product"), ("xla_blocked", "gpu", "xla_blocked"),
])
def test_resolve_attention_impl(impl, platform, expected):
    assert resolve_attention_impl(impl, platform) == expected


def test_unknown_attention_impl_is_a_user_error():
    with pytest.raises(UserError, match=r"attention_impl='nope'.*'xla_blocked', 'dot_product', 'splash', 'reference'"):
        ModelConfig(attention_impl="nope")
    with pytest.raises(ValueError, match="nope"):
        resolve_attention_impl("nope", "cpu")
