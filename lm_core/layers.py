"""Small building blocks of the decoder: RMSNorm, rotary embeddings, the SwiGLU FFN, the embedding.

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp", "vocab"); `lm_core.sharding`
maps those names to mesh axes, so no module here knows about devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lm_core.config import ModelConfig
from lm_core.sharding import constrain

Array = jax.Array
Aux = dict[str, Any]


@struct.dataclass
class TokenContext:
    """What a layer may need to know about the tokens besides their hidden states.

    `rng` and `routing` are what a model call lends its layers (`Transformer.hidden_states`): a key of this layer's
    own (folded with the layer index; None at evaluation and inference) for layers that draw randomness, such as
    MoMa's router noise, and a static, hashable choice of how routed layers pick tokens (moma.routing.RoutingMode;
    None: the way they were trained). Dense layers read neither.
    """

    tokens: Array  # [batch, seq] int32 token ids (MoE routes by modality derived from them)
    positions: Array  # [batch, seq] int32 position of each token inside its document
    segment_ids: Array  # [batch, seq] int32 document id inside a packed row; 0 marks padding
    rng: Array | None = None
    routing: Hashable | None = struct.field(pytree_node=False, default=None)

    def for_layer(self, index: Array | int) -> TokenContext:
        """This context as layer `index` sees it: its rng folded with the layer index (a key per layer)."""
        return self if self.rng is None else self.replace(rng=jax.random.fold_in(self.rng, index))


class FeedForward(Protocol):
    """The FFN seam: called as `ffn(x, context)` and returns `(y, aux)`.

    `aux` is a dict of auxiliary outputs (extra losses, router statistics) collected per layer into the model's
    output, so a paper package can add losses without the core knowing about them.
    """

    def __call__(self, x: Array, context: TokenContext) -> tuple[Array, Aux]: ...


FFNFactory = Callable[[ModelConfig, int, nnx.Rngs], FeedForward]


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], logical_axes: tuple[str | None, ...],
          dtype: Any) -> nnx.Param:
    """A parameter initialised by `init` and annotated with the logical names of its axes."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=logical_axes)


def fan_in_init(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]) -> Callable:
    """Truncated-normal init scaled by 1/sqrt(fan_in), for kernels with several input or output axes."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                             out_axis=out_axis)


def dense(x: Array, kernel: Array, contract: int = 1, preferred_element_type: Any = None) -> Array:
    """x's last `contract` axes times kernel's first `contract` axes, as ONE 2-D matmul.

    [batch, seq, *in] x [*in, *out] -> [batch, seq, *out]. XLA:CPU runs a flattened [tokens, in] @ [in, out] GEMM
    markedly faster than the equivalent 3-D einsum (benchmarks/train_step.py: ~30% on the FFN), and on
    accelerators it is the same dot. `preferred_element_type=jnp.float32` accumulates and returns float32 from
    bf16 operands (the output layer: logits rounded to bf16 lose the small differences the softmax needs).
    """
    lead, inner = x.shape[:-contract], x.shape[x.ndim - contract:]
    out = kernel.shape[contract:]
    flat = jnp.matmul(x.reshape(-1, math.prod(inner)), kernel.reshape(math.prod(inner), math.prod(out)),
                      preferred_element_type=preferred_element_type)
    return flat.reshape(*lead, *out)


def silu(x: Array) -> Array:
    # x·sigmoid(x) written out: on XLA:CPU it compiles to a faster forward and backward than jax.nn.silu.
    return x * jax.nn.sigmoid(x)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), config.weights_dtype)

    def __call__(self, x: Array) -> Array:
        # Normalise in float32: bf16 sums of squares lose too much precision.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """The [head_dim/2] float32 rotary inverse frequencies θ^(-2i/head_dim), rescaled as `config.rope_scaling` says.

    "llama3" (Llama 3.1's long-context rule, as `transformers` computes it): wavelengths longer than
    original_max_len / low_freq_factor are slowed down by `factor`, those shorter than
    original_max_len / high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    head_dim = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if config.rope_scaling == "none":
        return inv_freq.astype(np.float32)
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_len
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray | Array) -> Array:
    """Rotary position embedding, "rotate half" convention: [x1, x2] -> [x1·cos - x2·sin, x2·cos + x1·sin].

    x: [batch, seq, heads, head_dim]; positions: [batch, seq]; inv_freq: [head_dim/2] (`rope_frequencies`).
    Computed in float32 (large positions in bf16 would lose their low bits) and cast back. Written as
    x·[cos, cos] + roll(x, head_dim/2)·[-sin, sin]: the same numbers as splitting x in halves and concatenating
    the rotated halves, but XLA:CPU compiles the concatenate of two computed halves into a slow loop, and this
    form into a plain elementwise one (6x faster forward and backward; see benchmarks/train_step.py).
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [batch, seq, hd/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    signed_sin = jnp.concatenate([-sin, sin], axis=-1)  # [batch, seq, 1, head_dim]
    doubled_cos = jnp.concatenate([cos, cos], axis=-1)
    x32 = x.astype(jnp.float32)
    swapped = jnp.roll(x32, head_dim // 2, axis=-1)  # [x2, x1]
    return (x32 * doubled_cos + swapped * signed_sin).astype(x.dtype)


class SwiGLU(nnx.Module):
    """The dense FFN: down(silu(x·gate) * (x·up)). The default `FFNFactory` builds one per layer."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, d_ff: int | None = None):
        d, ff, dtype = config.d_model, d_ff or config.d_ff, config.weights_dtype
        self.compute_dtype = config.compute_dtype
        self.gate = param(rngs, fan_in_init(0, 1), (d, ff), ("embed", "mlp"), dtype)
        self.up = param(rngs, fan_in_init(0, 1), (d, ff), ("embed", "mlp"), dtype)
        self.down = param(rngs, fan_in_init(0, 1), (ff, d), ("mlp", "embed"), dtype)

    def __call__(self, x: Array, context: TokenContext | None = None) -> tuple[Array, Aux]:
        dtype = self.compute_dtype
        gate = dense(x, self.gate[...].astype(dtype))  # [batch, seq, d_ff]
        up = dense(x, self.up[...].astype(dtype))
        hidden = constrain(silu(gate) * up, ("batch", "act_seq", "act_mlp"))
        return dense(hidden, self.down[...].astype(dtype)), {}


def dense_ffn_factory(config: ModelConfig, layer_index: int, rngs: nnx.Rngs) -> FeedForward:
    del layer_index  # every layer gets the same dense FFN
    return SwiGLU(config, rngs=rngs)


class Embedding(nnx.Module):
    """Token embedding; with tied embeddings it also serves as the output layer (`attend`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.compute_dtype = config.compute_dtype
        self.scale_inputs = config.scale_embeddings
        init = nnx.initializers.normal(stddev=1.0 / config.d_model**0.5)
        self.table = param(rngs, init, (config.vocab_size, config.d_model), ("vocab", "embed"),
                           config.weights_dtype)

    def __call__(self, tokens: Array) -> Array:
        # Scale by sqrt(d) so the residual stream starts at unit RMS whatever the width (off for imported models
        # whose family does not, e.g. Llama: config.scale_embeddings).
        scale = self.table.shape[1] ** 0.5 if self.scale_inputs else 1.0
        # Gather from a whole table: a gather from a vocab- or fsdp-sharded table makes XLA replicate it anyway,
        # with a warning; saying so up front gives it one clean all-gather.
        table = constrain(self.table[...], (None, None))
        return (jnp.take(table, tokens, axis=0) * scale).astype(self.compute_dtype)

    def attend(self, hidden: Array) -> Array:
        """hidden [..., d] -> float32 logits [..., vocab], accumulated in float32 whatever the compute dtype."""
        return dense(hidden, self.table[...].astype(self.compute_dtype).T, preferred_element_type=jnp.float32)
