"""The optimised attention implementations behind `lm_core.attention.attend`, one per `ModelConfig.attention_impl`.

Each computes what `lm_core.attention.reference_attention` writes plainly (tests/test_attention_impl.py checks
logits and gradients of every one against it):
- `xla_blocked` (`grouped_query_attention`): tuned for XLA:CPU. Causal query blocks skip later keys, heads move
  ahead of the sequence so both matmuls are plain batched GEMMs, and the backward pass is written out.
- `dot_product` (`dot_product_attention`): `jax.nn.dot_product_attention`, cuDNN flash attention on GPU.
- `splash` (`splash_attention`): the Pallas TPU kernel, inside `jax.shard_map` under a mesh.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lm_core.sharding import logical_to_spec, mesh_axes_size

Array = jax.Array
MASKED = -1e30  # added to scores of masked keys; finite so fully masked rows (padding) stay NaN-free


def trace_platform() -> str:
    """The platform the code being traced will run on: the devices of the mesh set by `jax.set_mesh` when there
    is one (so an AOT compile for a TPU topology on a CPU host sees "tpu"), else `jax.default_backend()`."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform if isinstance(platform, str) else jax.default_backend()


def causal_blocks(seq_len: int) -> int:
    """How many query blocks causal attention over `seq_len` tokens is split into (blocks of >= 64 queries, <= 4).

    Block b of B attends only to keys [0, end of block b): about (B + 1) / 2B of the full score matrix, 62.5% at
    4 blocks. Fewer, larger matmuls win below 64 queries a block; past 4 blocks the saving flattens out.
    """
    return max(1, min(4, seq_len // 64))


def grouped_query_attention(queries: Array, keys: Array, values: Array, mask: Array, blocks: int = 1) -> Array:
    """Softmax attention where each group of query heads shares one key/value head.

    queries: [batch, q_seq, heads, hd]; keys, values: [batch, k_seq, kv_heads, hd]; mask: [batch, q_seq, k_seq].
    blocks > 1 splits the queries into that many consecutive blocks, each attending to the keys up to its own
    end only: exact when q_seq == k_seq and the mask is causal in slot order (no query sees a later key).
    """
    q_seq = queries.shape[1]
    if blocks <= 1:
        return _attend(queries, keys, values, mask)
    ends = [round(q_seq * (b + 1) / blocks) for b in range(blocks)]
    starts = [0, *ends[:-1]]
    return jnp.concatenate([_attend(queries[:, start:end], keys[:, :end], values[:, :end], mask[:, start:end, :end])
                            for start, end in zip(starts, ends, strict=True)], axis=1)


def _attend(queries: Array, keys: Array, values: Array, mask: Array) -> Array:
    """grouped_query_attention in one block. Heads are moved ahead of the sequence ([batch, kv_heads, group·q, hd])
    so both matmuls are plain batched GEMMs over (batch, kv_heads): on XLA:CPU about 2x faster forward and
    backward than contracting the [batch, seq, heads, hd] layout in place (benchmarks/train_step.py)."""
    batch, q_seq, heads, head_dim = queries.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    grouped = queries.reshape(batch, q_seq, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    grouped = grouped.reshape(batch, kv_heads, group * q_seq, head_dim)
    keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # [batch, kv_heads, k_seq, hd]
    out = _softmax_attention(grouped, keys, values, mask)  # [batch, kv_heads, group·q, hd]
    return out.reshape(batch, kv_heads, group, q_seq, head_dim).transpose(0, 3, 1, 2, 4).reshape(
        batch, q_seq, heads, head_dim)


def _masked(scores: Array, mask: Array, fill: float) -> Array:
    """scores [batch, kv_heads, group·q, k] with `fill` where mask [batch, q, k] is False (same for every head)."""
    batch, kv_heads, rows, k_seq = scores.shape
    q_seq = mask.shape[1]
    grouped = scores.reshape(batch, kv_heads, rows // q_seq, q_seq, k_seq)
    return jnp.where(mask[:, None, None, :, :], grouped, fill).reshape(scores.shape)


def _attention_weights(queries: Array, keys: Array, mask: Array) -> Array:
    """softmax(q·kᵀ/sqrt(hd)) over unmasked keys, float32 [batch, kv_heads, group·q, k]. The scores accumulate in
    float32 also for bf16 inputs (a bf16 q·kᵀ would round every score to 8 bits before the softmax)."""
    scores = jnp.einsum("bkqh,bkth->bkqt", queries, keys, preferred_element_type=jnp.float32)
    scores = scores * queries.shape[-1] ** -0.5
    return jax.nn.softmax(_masked(scores, mask, MASKED), axis=-1)


@jax.custom_vjp
def _softmax_attention(queries: Array, keys: Array, values: Array, mask: Array) -> Array:
    """softmax(q·kᵀ/sqrt(hd)) v in the heads-major layout; queries [batch, kv_heads, group·q, hd].

    The backward pass is written out (`_softmax_attention_bwd`) because autodiff of the softmax computes the
    row sums Σ_t P·dP over the whole [rows, k] score matrix, while the same numbers are Σ_h dO·O over head_dim:
    Σ_t P_t (dO·v_t) = dO·Σ_t P_t v_t = dO·O. That removes a pass over the scores (on XLA:CPU the single
    largest non-matmul op of a train step); tests/test_model.py checks the gradients against autodiff.
    """
    return _softmax_attention_fwd(queries, keys, values, mask)[0]


def _softmax_attention_fwd(queries: Array, keys: Array, values: Array, mask: Array) -> tuple[Array, tuple]:
    weights = _attention_weights(queries, keys, mask)
    out = jnp.einsum("bkqt,bkth->bkqh", weights.astype(values.dtype), values)
    return out, (queries, keys, values, mask, weights, out)


def _softmax_attention_bwd(residuals: tuple, d_out: Array) -> tuple[Array, Array, Array, None]:
    queries, keys, values, mask, weights, out = residuals
    d_values = jnp.einsum("bkqt,bkqh->bkth", weights.astype(values.dtype), d_out)
    d_weights = jnp.einsum("bkqh,bkth->bkqt", d_out, values, preferred_element_type=jnp.float32)
    row_sums = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # masked keys got a constant score: no gradient flows to them (also not in fully masked padding rows)
    d_scores = _masked(weights * (d_weights - row_sums), mask, 0.0) * queries.shape[-1] ** -0.5
    d_scores = d_scores.astype(queries.dtype)
    d_queries = jnp.einsum("bkqt,bkth->bkqh", d_scores, keys)
    d_keys = jnp.einsum("bkqt,bkqh->bkth", d_scores, queries)
    return d_queries, d_keys, d_values, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def dot_product_implementation(platform: str, dtype: jnp.dtype, head_dim: int) -> str:
    """`implementation=` for jax.nn.dot_product_attention: "cudnn" (flash attention) on an NVIDIA GPU for the
    fp16/bf16, head_dim % 8 == 0 inputs cuDNN takes, else "xla". (`None` would mean "xla" in this JAX: it does
    not pick cuDNN by itself.)"""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform in ("gpu", "cuda") and half and head_dim % 8 == 0 else "xla"


def dot_product_attention(queries: Array, keys: Array, values: Array, mask: Array, *, causal: bool) -> Array:
    """`jax.nn.dot_product_attention` in the BTNH layout; GQA natively (K/V keep their kv_heads).

    The packed-document mask goes in as the boolean `mask` [batch, 1, q, k]: jax.nn exposes no segment-id
    argument (cuDNN's packed THD layout is not reachable through it, and its seq-lengths only mask right
    padding). On cuDNN the mask becomes a dense additive bias [batch, 1, q, k] that the kernel reads for every
    tile, and `is_causal` (training path only; a decode step's queries sit at an offset) lets it skip the tiles
    above the diagonal. The XLA path accumulates the scores in float32 and applies the mask to them.
    """
    mask = mask[:, None]
    implementation = dot_product_implementation(trace_platform(), queries.dtype, queries.shape[-1])
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(queries, keys, values, mask=mask, is_causal=causal,
                                                implementation="cudnn")
        except NotImplementedError as err:  # raised at trace time for shapes cuDNN does not support
            warnings.warn(f"cuDNN attention unavailable ({err}); using the XLA implementation", stacklevel=2)
    return jax.nn.dot_product_attention(queries, keys, values, mask=mask, is_causal=causal, implementation="xla")


def splash_block_size(seq_len: int) -> int:
    """Tile size of the splash kernel for `seq_len` tokens: the largest of 512, 256, 128 dividing it."""
    if seq_len % 128:
        raise ValueError(f"attention_impl='splash' needs a sequence length that is a multiple of 128, got "
                         f"seq={seq_len}; pad the sequence to a multiple of 128 or use 'dot_product'/'xla_blocked'")
    return next(block for block in (512, 256, 128) if seq_len % block == 0)


def splash_attention(queries: Array, keys: Array, values: Array, query_segments: Array,
                     key_segments: Array) -> Array:
    """Causal, segment-masked attention by the Pallas TPU splash kernel (flash attention that skips fully
    masked tiles); queries [batch, seq, heads, hd], keys/values [batch, seq, kv_heads, hd].

    Pallas kernels do not partition automatically, so under a mesh the kernel runs inside `jax.shard_map` on
    each device's batch and head shard (layout as `constrain` puts them). On CPU it runs in Pallas interpret
    mode (the same kernel as plain XLA ops: slow, for tests).
    """
    batch, seq, heads, head_dim = queries.shape
    platform = trace_platform()
    if platform not in ("tpu", "cpu"):
        raise ValueError(f"attention_impl='splash' is a TPU kernel; on {platform!r} use 'dot_product'")
    block = splash_block_size(seq)
    # the kernel does not scale the scores: scale the queries (in float32, rounded once to their dtype)
    queries = (queries.astype(jnp.float32) * head_dim ** -0.5).astype(queries.dtype)

    def local(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array) -> Array:
        return _splash_local(q, k, v, q_segments, kv_segments, block=block, interpret=platform == "cpu")

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(queries, keys, values, query_segments, key_segments)
    qkv_spec, segment_spec = _splash_specs(mesh, batch, heads, keys.shape[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, segment_spec, segment_spec),
                         out_specs=qkv_spec, check_vma=False)(queries, keys, values, query_segments, key_segments)


def _splash_specs(mesh: jax.sharding.AbstractMesh, batch: int, heads: int,
                  kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
    """shard_map specs for [batch, seq, heads, hd] and [batch, seq]: batch and heads split as the activations
    are ("batch", "act_heads"), a dimension the mesh cannot split evenly kept whole. Query and KV heads split
    over the same axis, so local query head i still uses local KV head i // group."""
    batch_entry, _, head_entry, _ = logical_to_spec(("batch", None, "act_heads", None), mesh.axis_names)
    if batch % mesh_axes_size(mesh, batch_entry):
        batch_entry = None
    if heads % mesh_axes_size(mesh, head_entry) or kv_heads % mesh_axes_size(mesh, head_entry):
        head_entry = None
    return PartitionSpec(batch_entry, None, head_entry, None), PartitionSpec(batch_entry, None)


def _splash_local(queries: Array, keys: Array, values: Array, query_segments: Array, key_segments: Array, *,
                  block: int, interpret: bool) -> Array:
    """splash on one device's shard. The kernel works on one example in the heads-major layout ([heads, seq, hd];
    K/V [kv_heads, seq, hd]: its MHA form maps query head h to KV head h // group, GQA without copying K/V), so
    it is vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    seq, heads = queries.shape[1], queries.shape[2]
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array) -> Array:
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=q_segments, kv=kv_segments))

    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(one)(heads_major(queries), heads_major(keys), heads_major(values), query_segments, key_segments)
    return heads_major(out)
