"""The TTFT path: the aux reads the prompt, the base writes the answer (paper §"Inference").

    prompt[:-1] -> A (K,V of every aux layer) -> P -> predicted base cache   (cheap: A's cost per token)
    prompt[-1]  -> B on that cache -> first token from B's logits            (one base token step)
    then B alone decodes, appending its own true K,V (lm_core.generation.decode); A and P are never used again.

Prompts of different lengths are LEFT-padded as in `lm_core.generation` (padding has segment id 0 and is never
attended; positions start at 0 on each row's first real token), so the last column is every row's last prompt
token. `ttft_flops` is the analytic cost of this path next to base-only prefill.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kv_prediction.model import KVPModel
from lm_core.attention import LayerKV
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.flops import flops_per_token
from lm_core.generation import SamplingConfig, decode, left_pad
from lm_core.kv_cache import KVCache
from lm_core.model import Transformer

Array = jax.Array


def padded_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segment_ids) [batch, width >= 2], left-padded.

    At least two columns so that "every prompt token but the last" is never an empty array (one-token prompts
    then give the aux only padding, which nothing attends to).
    """
    tokens, positions, segment_ids = left_pad(prompts, pad_id)
    if tokens.shape[1] == 1:
        tokens, positions, segment_ids = (np.pad(a, [(0, 0), (1, 0)], constant_values=v)
                                          for a, v in ((tokens, pad_id), (positions, 0), (segment_ids, 0)))
    return tokens, positions, segment_ids


def first_logits_on_kv(base: Transformer, prompt_kv: Sequence[LayerKV], tokens: Array, positions: Array,
                       segment_ids: Array, cache_len: int) -> tuple[Array, KVCache]:
    """Base cache from the K,V of tokens[:, :-1], then B runs the last prompt token on it.

    Returns (logits [batch, vocab] of the last prompt token, the cache with every prompt slot filled).
    """
    cache = base.cache_from_kv(prompt_kv, positions[:, :-1], segment_ids[:, :-1], cache_len)
    out = base(tokens[:, -1:], positions=positions[:, -1:], segment_ids=segment_ids[:, -1:], cache=cache)
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def kvp_prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, segment_ids: Array,
                cache_len: int) -> tuple[Array, KVCache]:
    """Steps 1-3 of the TTFT path for a `KVPModel` split into (graphdef, params); inputs [batch, width]."""
    model = nnx.merge(graphdef, params)
    predicted = model.predict_kv(tokens[:, :-1], positions=positions[:, :-1], segment_ids=segment_ids[:, :-1])
    return first_logits_on_kv(model.base, predicted, tokens, positions, segment_ids, cache_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill_on_kv(graphdef: nnx.GraphDef, params: nnx.State, prompt_kv: Sequence[LayerKV], tokens: Array,
                  positions: Array, segment_ids: Array, cache_len: int) -> tuple[Array, KVCache]:
    """Step 3 alone for a base `Transformer` and GIVEN pre-RoPE K,V of tokens[:, :-1] (e.g. an oracle's)."""
    return first_logits_on_kv(nnx.merge(graphdef, params), prompt_kv, tokens, positions, segment_ids, cache_len)


# --- the compiled first-token functions TTFT is measured on ----------------------------------------------------


def unpadded_layout(tokens: Array) -> tuple[Array, Array]:
    """(positions 0..N-1, segment ids all 1), each [batch, N], for prompts that fill their rows exactly."""
    batch, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    return positions, jnp.ones((batch, width), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def plain_first_token(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, cache_len: int
                      ) -> tuple[Array, KVCache]:
    """A model alone (base-only or aux-only) prefilling unpadded prompts [batch, N]: (first token [batch], cache).

    Logits only for the last position (the others are not needed to answer); the cache is filled for decoding.
    """
    model = nnx.merge(graphdef, params)
    hidden, cache = model.prefill(tokens, *unpadded_layout(tokens), cache_len)
    return jnp.argmax(model.logits(hidden[:, -1:])[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def kvp_first_token(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
    """The whole KVP TTFT path in one compiled function for unpadded prompts [batch, N]: (first token, base cache)."""
    first_logits, cache = kvp_prefill(graphdef, params, tokens, *unpadded_layout(tokens), cache_len)
    return jnp.argmax(first_logits, axis=-1).astype(jnp.int32), cache


def check_lengths(base_config: ModelConfig, aux_config: ModelConfig | None, prompt_width: int,
                  max_new_tokens: int) -> int:
    """The cache length prompt + new tokens, or a UserError when a model cannot hold that many positions."""
    cache_len = prompt_width + max_new_tokens
    if cache_len > base_config.max_seq_len:
        raise UserError(f"prompt of {prompt_width} tokens + max_new_tokens={max_new_tokens} exceeds the base "
                        f"model's max_seq_len={base_config.max_seq_len}")
    if aux_config is not None and prompt_width - 1 > aux_config.max_seq_len:
        raise UserError(f"prompt of {prompt_width} tokens has the auxiliary model read {prompt_width - 1}, more "
                        f"than its max_seq_len={aux_config.max_seq_len}")
    return cache_len


def _decode_with_base(base: Transformer, first_logits: Array, cache: KVCache, positions: np.ndarray,
                      config: SamplingConfig, rng: Array | None) -> np.ndarray:
    graphdef, params = nnx.split(base)
    rng = jax.random.key(0) if rng is None else rng
    next_positions = jnp.asarray(positions[:, -1] + 1)
    return np.asarray(decode(graphdef, params, first_logits, cache, next_positions, rng, config))


def generate_kvp(model: KVPModel, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 rng: Array | None = None) -> np.ndarray:
    """New tokens [batch, max_new_tokens] via the TTFT path (A + P read the prompt, B generates)."""
    tokens, positions, segment_ids = padded_prompts(prompts, config.pad_id)
    cache_len = check_lengths(model.base.config, model.aux.config, tokens.shape[1], config.max_new_tokens)
    graphdef, params = nnx.split(model)
    first_logits, cache = kvp_prefill(graphdef, params, tokens, positions, segment_ids, cache_len)
    return _decode_with_base(model.base, first_logits, cache, positions, config, rng)


def generate_on_kv(base: Transformer, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                   prompt_kv: Sequence[LayerKV], config: SamplingConfig, rng: Array | None = None) -> np.ndarray:
    """Base generation from given K,V for every prompt token but the last (layout from `padded_prompts`).

    With the base's own K,V this is plain base generation: the "perfect predictor" reference point.
    """
    cache_len = check_lengths(base.config, None, tokens.shape[1], config.max_new_tokens)
    graphdef, params = nnx.split(base)
    first_logits, cache = prefill_on_kv(graphdef, params, tuple(prompt_kv), tokens, positions, segment_ids,
                                        cache_len)
    return _decode_with_base(base, first_logits, cache, positions, config, rng)


# --- what the TTFT path costs ---------------------------------------------------------------------------------


def predictor_flops_per_token(base_config: ModelConfig, aux_config: ModelConfig) -> float:
    """2 maps (K, V) per base layer, each a [kv_A·hd_A, kv_B·hd_B] matmul (2 FLOPs per multiply-add)."""
    in_dim = aux_config.num_kv_heads * aux_config.head_dim
    out_dim = base_config.num_kv_heads * base_config.head_dim
    return 2.0 * 2 * in_dim * out_dim * base_config.num_layers


def prefill_flops(config: ModelConfig, prompt_len: int) -> float:
    """A model alone reading an N-token prompt to its first token: N causal tokens, logits for the last only."""
    per_token = flops_per_token(config, prompt_len)
    return prompt_len * (per_token.forward - per_token.output_layer) + per_token.output_layer


@dataclasses.dataclass(frozen=True)
class TTFTFlops:
    """Forward FLOPs to the first token of an N-token prompt (lm_core.flops conventions: matmuls only)."""

    prompt_len: int
    auxiliary: float  # A on tokens 1..N-1, causal, no output layer (its logits are not needed)
    predictor: float  # P on N-1 tokens
    base_last_token: float  # B on token N, attending to all N cache slots, plus its output layer
    base_only: float  # B alone: `prefill_flops(base, N)`

    @property
    def kvp(self) -> float:
        """≈ N·t_A(1) + t_P(N) + t_B(1)."""
        return self.auxiliary + self.predictor + self.base_last_token

    @property
    def reduction(self) -> float:
        """base-only / KVP TTFT FLOPs (≈ t_B(1) / t_A(1) for long prompts)."""
        return self.base_only / self.kvp


def ttft_flops(base_config: ModelConfig, aux_config: ModelConfig, prompt_len: int) -> TTFTFlops:
    if not isinstance(prompt_len, int) or prompt_len < 1:
        raise UserError(f"prompt_len={prompt_len!r} is invalid; valid: a positive integer")
    read = prompt_len - 1
    auxiliary = predictor = 0.0
    if read:
        per_aux_token = flops_per_token(aux_config, read)
        auxiliary = read * (per_aux_token.forward - per_aux_token.output_layer)
        predictor = read * predictor_flops_per_token(base_config, aux_config)
    base_last_token = flops_per_token(base_config, prompt_len, causal=False).forward  # 1 query, N keys
    return TTFTFlops(prompt_len, auxiliary, predictor, base_last_token, prefill_flops(base_config, prompt_len))
