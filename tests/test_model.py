"""Model equivalences: cached decode == full forward, injected true KV == normal forward, packed isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.attention import LayerKV, reference_attention
from lm_core.attention_kernels import causal_blocks, grouped_query_attention
from lm_core.config import ModelConfig
from lm_core.kv_cache import init_cache
from lm_core.layers import SwiGLU, apply_rope, rope_frequencies
from lm_core.model import REMAT_POLICIES, Transformer
from tests.helpers import tiny_config

ATOL = 1e-5


def build(**changes) -> Transformer:
    return Transformer(tiny_config(**changes), rngs=nnx.Rngs(0))


def packed_inputs(batch: int = 2, seq: int = 12):
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, 128)
    split = 5
    segment_ids = jnp.broadcast_to(jnp.where(jnp.arange(seq) < split, 1, 2), (batch, seq)).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.where(jnp.arange(seq) < split, jnp.arange(seq), jnp.arange(seq) - split),
                                 (batch, seq)).astype(jnp.int32)
    return tokens, positions, segment_ids


@pytest.mark.parametrize("changes", [dict(), dict(num_kv_heads=8), dict(num_kv_heads=2, qk_norm=True),
                                     dict(tie_embeddings=False, norm_placement="swin")])
@pytest.mark.parametrize("packed", [False, True])
def test_cached_decode_matches_full_forward(changes, packed):
    model = build(**changes)
    tokens, positions, segment_ids = packed_inputs()
    if not packed:
        positions = segment_ids = None
    full = model(tokens, positions=positions, segment_ids=segment_ids).logits

    prefill = 4
    sl = (lambda a, s: None if a is None else a[:, s])
    out = model(tokens[:, :prefill], positions=sl(positions, slice(0, prefill)),
                segment_ids=sl(segment_ids, slice(0, prefill)), cache=init_cache(model.config, 2, 16))
    step_logits, cache = [out.logits], out.cache
    for t in range(prefill, tokens.shape[1]):
        out = model(tokens[:, t:t + 1], positions=sl(positions, slice(t, t + 1)),
                    segment_ids=sl(segment_ids, slice(t, t + 1)), cache=cache)
        step_logits.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full, atol=ATOL)
    assert int(cache.index) == tokens.shape[1]


@pytest.mark.parametrize("seq,blocks", [(100, 3), (64, 4), (7, 2)])
def test_blocked_causal_attention_equals_one_block(seq, blocks):
    # Query blocks that skip later keys must give exactly what masking the full score matrix gives, for uneven
    # blocks, grouped heads (8 query heads on 2 KV heads) and packed documents.
    q, k, v = (jax.random.normal(jax.random.key(i), (2, seq, heads, 16)) for i, heads in enumerate((8, 2, 2)))
    slots = jnp.arange(seq)
    segments = jnp.stack([jnp.where(slots < seq // 3, 1, 2), jnp.ones(seq, jnp.int32)])
    mask = (slots[None, None, :] <= slots[None, :, None]) & (segments[:, :, None] == segments[:, None, :])
    whole = grouped_query_attention(q, k, v, mask)
    np.testing.assert_allclose(grouped_query_attention(q, k, v, mask, blocks), whole, atol=1e-6)
    # and the unblocked path is plain softmax attention (head h uses KV head h // 4)
    scores = jnp.einsum("bqhd,bthd->bhqt", q, jnp.repeat(k, 4, axis=2)) / 4.0
    weights = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(whole, jnp.einsum("bhqt,bthd->bqhd", weights, jnp.repeat(v, 4, axis=2)), atol=1e-6)


@pytest.mark.parametrize("blocks", [1, 3])
def test_attention_gradients_equal_autodiff_of_plain_softmax_attention(blocks):
    # The hand-written backward (row sums as dO·O) against jax.grad of the plain formula (reference_attention): grouped
    # heads, packed documents and, unblocked, a query with no visible key at all (no score gets a gradient; its
    # uniform weights still pass one to the values). Blocks assume every query sees a key, as causal masks do.
    seq = 96
    q, k, v, w = (jax.random.normal(jax.random.key(i), (2, seq, heads, 16)) for i, heads in enumerate((8, 2, 2, 8)))
    slots = jnp.arange(seq)
    segments = jnp.stack([jnp.where(slots < 40, 1, 2), jnp.where(slots < 10, 0, 1)])
    mask = (slots[None, None, :] <= slots[None, :, None]) & (segments[:, :, None] == segments[:, None, :])
    if blocks == 1:
        mask = mask.at[1, 5].set(False)  # query 5 of row 1 sees nothing

    ours = jax.grad(lambda *a: jnp.sum(grouped_query_attention(*a, mask, blocks) * w), (0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(reference_attention(*a, mask) * w), (0, 1, 2))(q, k, v)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))))


def test_long_forward_uses_blocks_and_matches_cached_prefill():
    model = build(max_seq_len=256)
    seq = 200
    assert causal_blocks(seq) == 3
    tokens = jax.random.randint(jax.random.key(2), (1, seq), 0, 128)
    full = model(tokens).logits
    cached = model(tokens, cache=init_cache(model.config, 1, seq + 8))  # the cache path attends in one block
    np.testing.assert_allclose(full, cached.logits, atol=ATOL)
    # Transformer.prefill (cache-free, blocked attention) fills the same cache the cached forward does
    positions = jnp.arange(seq, dtype=jnp.int32)[None]
    hidden, cache = model.prefill(tokens, positions, jnp.ones_like(tokens), seq + 8)
    np.testing.assert_allclose(model.logits(hidden), full, atol=ATOL)
    for mine, theirs in zip(jax.tree.leaves(cache), jax.tree.leaves(cached.cache), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=ATOL)


def test_rope_rotates_each_half_pair_by_its_angle():
    # Hand-written reference: pair (x[i], x[i + d/2]) rotated by position * theta^(-2i/d).
    x = jax.random.normal(jax.random.key(3), (1, 3, 2, 8))
    positions = jnp.array([[0, 5, 1000]])
    inv_freq = rope_frequencies(ModelConfig(d_model=16, num_heads=2, rope_theta=100.0))  # head_dim 8
    out = np.asarray(apply_rope(x, positions, inv_freq))
    xs = np.asarray(x, np.float64)
    for t, pos in enumerate([0, 5, 1000]):
        for i in range(4):
            angle = pos * 100.0 ** (-2 * i / 8)
            a, b = xs[0, t, :, i], xs[0, t, :, i + 4]
            np.testing.assert_allclose(out[0, t, :, i], a * np.cos(angle) - b * np.sin(angle), atol=1e-4)
            np.testing.assert_allclose(out[0, t, :, i + 4], b * np.cos(angle) + a * np.sin(angle), atol=1e-4)


def test_packed_documents_do_not_attend_to_each_other():
    model = build()
    tokens, positions, segment_ids = packed_inputs()
    changed_first_doc = tokens.at[:, :5].set((tokens[:, :5] + 7) % 128)
    a = model(tokens, positions=positions, segment_ids=segment_ids).logits
    b = model(changed_first_doc, positions=positions, segment_ids=segment_ids).logits
    np.testing.assert_allclose(a[:, 5:], b[:, 5:], atol=ATOL)  # the second document cannot see the first
    assert not np.allclose(a[:, :5], b[:, :5])
    # ... and the second document equals running it alone from position 0
    alone = model(tokens[:, 5:]).logits
    np.testing.assert_allclose(a[:, 5:], alone, atol=ATOL)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_injected_true_kv_reproduces_forward(qk_norm):
    model = build(qk_norm=qk_norm)
    tokens, positions, segment_ids = packed_inputs()
    out = model(tokens, positions=positions, segment_ids=segment_ids, return_kv=True)
    assert len(out.kv) == 2 and out.kv[0].keys.shape == (2, 12, 4, 8)
    injected = model(tokens, positions=positions, segment_ids=segment_ids, injected_kv=out.kv).logits
    np.testing.assert_allclose(injected, out.logits, atol=ATOL)
    perturbed = [LayerKV(kv.keys + 1.0, kv.values) for kv in out.kv]
    assert not np.allclose(model(tokens, injected_kv=perturbed).logits, out.logits, atol=1e-3)


def test_keys_are_returned_before_rope():
    # Pre-RoPE keys are just x @ W_k, so the same token at two positions gives the same key (layer 0).
    model = build()
    tokens = jnp.array([[9, 9, 9]])
    kv = model(tokens, return_kv=True).kv[0]
    np.testing.assert_allclose(kv.keys[0, 0], kv.keys[0, 2], atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cache_from_kv_continues_like_prefill(qk_norm):
    model = build(qk_norm=qk_norm)
    tokens, positions, segment_ids = packed_inputs()
    out = model(tokens, positions=positions, segment_ids=segment_ids, return_kv=True)
    n = 11
    prefix_kv = [LayerKV(kv.keys[:, :n], kv.values[:, :n]) for kv in out.kv]
    cache = model.cache_from_kv(prefix_kv, positions[:, :n], segment_ids[:, :n], cache_len=16)
    last = model(tokens[:, n:], positions=positions[:, n:], segment_ids=segment_ids[:, n:], cache=cache).logits
    np.testing.assert_allclose(last[:, 0], out.logits[:, n], atol=ATOL)


def logits_and_grads(model: Transformer, tokens: jax.Array, **kwargs) -> tuple[jax.Array, nnx.State]:
    """The model's logits and the gradients of mean(logits²) w.r.t. its parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        logits = nnx.merge(graphdef, params, rest)(tokens, **kwargs).logits
        return jnp.mean(logits**2), logits

    (_, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return logits, grads


@pytest.mark.parametrize("remat", [True, *REMAT_POLICIES, "ffn_only"])  # True: the old switch, "full"
def test_remat_gives_the_plain_logits_and_gradients(remat):
    # Unrolled and run op by op, remat recomputes the forward with the very same ops on the same inputs, so the
    # gradients are bit-identical to the plain model's (tests/test_scan_remat.py checks the scanned layout).
    tokens, positions, segment_ids = packed_inputs()
    plain_logits, plain_grads = logits_and_grads(build(), tokens, positions=positions, segment_ids=segment_ids)
    logits, grads = logits_and_grads(build(remat=remat), tokens, positions=positions, segment_ids=segment_ids)
    np.testing.assert_array_equal(logits, plain_logits)
    plain_leaves, leaves = jax.tree.leaves_with_path(plain_grads), jax.tree.leaves_with_path(grads)
    assert [path for path, _ in leaves] == [path for path, _ in plain_leaves]
    assert all(np.abs(g).sum() > 0 for _, g in plain_leaves)  # not a comparison of zeros
    for (path, got), (_, want) in zip(leaves, plain_leaves, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute():
    tokens, _, _ = packed_inputs()
    plain = build()(tokens).logits
    bf16 = build(dtype="bfloat16")(tokens).logits
    assert bf16.dtype == jnp.float32  # logits always come back in float32 for the loss
    np.testing.assert_allclose(bf16, plain, atol=0.15)


def test_ffn_factory_seam_collects_aux():
    class CountingFFN(SwiGLU):
        def __call__(self, x, context):
            y, _ = super().__call__(x, context)
            return y, {"router_loss": jnp.mean(jnp.abs(y)), "tokens_seen": context.tokens.size}

    def factory(config, layer_index, rngs):
        return CountingFFN(config, rngs=rngs) if layer_index == 1 else SwiGLU(config, rngs=rngs)

    model = Transformer(tiny_config(), rngs=nnx.Rngs(0), ffn_factory=factory)
    out = model(jnp.ones((2, 5), jnp.int32))
    assert out.aux[0] == {}
    assert out.aux[1]["tokens_seen"] == 10 and out.aux[1]["router_loss"] > 0
