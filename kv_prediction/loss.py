"""The 3-term KV-prediction objective, with the lm_core loss signature `(model, batch, rng) -> (loss, metrics)`.

    L = λ_B · CE(B on predicted K,V) + λ_A · CE(A) + λ_C · Σ_layers [L1(K̂, K) + L1(V̂, V)]

Each L1 is the mean absolute error over the real tokens' elements of one layer (padding masked out), as in the
reference (`get_cache_losses`). λ_C defaults to 1/n_B, i.e. the AVERAGE over base layers, which the paper found
better than the sum (λ_C = 1); λ_C = 0 was much worse.

Keys are compared where the base uses them: with QK-norm the base normalises every key per head before RoPE, so
the scale of a pre-norm key is invisible to it; `normalize_keys=True` (default) applies the base's frozen key norm
to predicted and true keys before the L1, as the reference does, instead of penalising that free scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kv_prediction.model import KVPModel
from lm_core.attention import LayerKV
from lm_core.loss import output_layer_loss
from lm_core.model import Transformer

Array = jax.Array
Batch = dict[str, Array]


def token_mask(batch: Batch) -> Array:
    """[batch, seq] float32, 1 on real tokens: segment id != 0 when the batch has segment ids, else loss_mask.

    Segment ids say which tokens exist; loss_mask also drops real tokens without a target, whose K,V still count.
    """
    if "segment_ids" in batch:
        return (batch["segment_ids"] != 0).astype(jnp.float32)
    return batch["loss_mask"].astype(jnp.float32)


def masked_l1(predicted: Array, target: Array, mask: Array) -> Array:
    """Mean |predicted - target| over the elements of unmasked tokens.

    predicted, target: [batch, seq, heads, head_dim]; mask: [batch, seq] (1 = counts). 0 when nothing counts.
    """
    error = jnp.abs(predicted.astype(jnp.float32) - target.astype(jnp.float32))  # [batch, seq, heads, head_dim]
    per_token = jnp.sum(error, axis=(2, 3))  # [batch, seq]
    elements = jnp.sum(mask) * predicted.shape[2] * predicted.shape[3]
    return jnp.sum(per_token * mask) / jnp.maximum(elements, 1.0)


def normalized_keys(base: Transformer, kv: Sequence[LayerKV]) -> tuple[LayerKV, ...]:
    """Each layer's keys after that base layer's key norm (unchanged without QK-norm)."""
    if not base.config.qk_norm:
        return tuple(kv)
    return tuple(LayerKV(base.block(i).attention.key_norm(layer.keys), layer.values)
                 for i, layer in enumerate(kv))


def consistency_terms(predicted: Sequence[LayerKV], true: Sequence[LayerKV], mask: Array) -> tuple[Array, Array]:
    """(per-layer key L1 [n_layers], per-layer value L1 [n_layers])."""
    keys = jnp.stack([masked_l1(p.keys, t.keys, mask) for p, t in zip(predicted, true, strict=True)])
    values = jnp.stack([masked_l1(p.values, t.values, mask) for p, t in zip(predicted, true, strict=True)])
    return keys, values


def kvp_loss(model: KVPModel, batch: Batch, rng: Array | None = None, *, lambda_base: float = 1.0,
             lambda_aux: float = 1.0, lambda_consistency: float | None = None, z_loss_weight: float = 0.0,
             normalize_keys: bool = True, chunk_tokens: int = 0) -> tuple[Array, dict[str, Any]]:
    """The KVP objective over a packed batch (keys as produced by `lm_core.data`).

    lambda_consistency=None means 1/n_base_layers. z_loss_weight applies to both cross-entropies (reference:
    `use_z_loss` on base and aux logits). metrics["loss"] is the base-on-predicted-KV cross-entropy, the number
    the KVP model is judged by (the trainer logs it and stops on non-finite values); the full objective comes back
    from the train step as metrics["objective"]. chunk_tokens > 0 computes both output layers in token chunks
    (lm_core.loss.chunked_cross_entropy), so neither model's [tokens, vocab] logits exist at once.
    """
    del rng  # deterministic objective; part of the lm_core loss signature
    if lambda_consistency is None:
        lambda_consistency = 1.0 / model.num_base_layers
    out = model.forward_train(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    base = model.frozen_base()
    targets, mask = batch["targets"], batch["loss_mask"]
    base_loss, base_metrics = output_layer_loss(base, out.base_hidden, targets, mask, z_loss_weight, chunk_tokens)
    aux_loss, aux_metrics = output_layer_loss(model.aux, out.aux_hidden, targets, mask, z_loss_weight, chunk_tokens)
    predicted, true = out.predicted_kv, out.true_kv
    if normalize_keys:
        predicted, true = normalized_keys(base, predicted), normalized_keys(base, true)
    key_l1, value_l1 = consistency_terms(predicted, true, token_mask(batch))
    consistency = jnp.sum(key_l1) + jnp.sum(value_l1)
    loss = lambda_base * base_loss + lambda_aux * aux_loss + lambda_consistency * consistency
    metrics = {
        "loss": base_metrics["loss"],
        "base_ce": base_metrics["loss"],
        "aux_ce": aux_metrics["loss"],
        "consistency": consistency,
        "key_l1": jnp.mean(key_l1),
        "value_l1": jnp.mean(value_l1),
        "z_loss": base_metrics["z_loss"],
        "aux_z_loss": aux_metrics["z_loss"],
        "nll": base_metrics["nll"],
        "tokens": base_metrics["tokens"],
    }
    return loss, metrics
