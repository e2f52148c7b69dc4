"""Next-token cross-entropy with z-loss: the loss most experiments start from."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Batch = dict[str, Array]


def cross_entropy(logits: Array, targets: Array, mask: Array, z_loss_weight: float = 0.0
                  ) -> tuple[Array, dict[str, Array]]:
    """Mean masked cross-entropy plus z-loss (weight · mean log²Z, keeps the softmax normaliser near 1).

    logits: [batch, seq, vocab] float32; targets: [batch, seq] int; mask: [batch, seq] (1 = counts).
    Returns (loss to minimise, metrics) with metrics["nll"] the summed negative log-likelihood in nats and
    metrics["tokens"] the number of counted tokens, so callers can combine batches exactly.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logits) * mask
    tokens = jnp.sum(mask)
    denominator = jnp.maximum(tokens, 1.0)
    ce = jnp.sum(nll) / denominator
    z_loss = jnp.sum(jnp.square(log_z) * mask) / denominator
    loss = ce + z_loss_weight * z_loss
    return loss, {"loss": ce, "z_loss": z_loss, "nll": jnp.sum(nll), "tokens": tokens}


def next_token_loss(model: Any, batch: Batch, rng: Array | None = None, *, z_loss_weight: float = 0.0,
                    chunk_tokens: int = 0) -> tuple[Array, dict[str, Array]]:
    """The standard language-model loss over a packed batch (keys as produced by `lm_core.data`).

    `chunk_tokens` > 0 computes the output layer and loss in chunks of that many tokens (`chunked_cross_entropy`)
    so the [tokens, vocab] logits never exist at once. `rng` is unused here; it is part of the loss-function
    signature `(model, batch, rng)` that the train step calls, for losses that need randomness.
    """
    del rng
    inputs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    if chunk_tokens > 0:
        hidden, _, _, aux = model.hidden_states(batch["inputs"], **inputs)
        loss, metrics = chunked_cross_entropy(hidden, model.output_matrix(), batch["targets"], batch["loss_mask"],
                                              z_loss_weight, chunk_tokens)
    else:
        output = model(batch["inputs"], **inputs)
        aux = output.aux
        loss, metrics = cross_entropy(output.logits, batch["targets"], batch["loss_mask"], z_loss_weight)
    aux_losses = [value for layer in aux for name, value in layer.items() if name.endswith("_loss")]
    if aux_losses:
        # FFN seams report extra losses as "<name>_loss" entries of their aux dict; they join the objective.
        aux_total = sum(aux_losses)
        loss = loss + aux_total
        metrics["aux_loss"] = aux_total
    return loss, metrics


def chunked_cross_entropy(hidden: Array, output_matrix: Array, targets: Array, mask: Array,
                          z_loss_weight: float = 0.0, chunk_tokens: int = 1024) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy` of `hidden @ output_matrix` without ever holding all the logits.

    hidden: [batch, seq, d]; output_matrix: [d, vocab]. Tokens are processed in chunks of `chunk_tokens`; each
    chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of stored, so memory for the
    output layer is O(chunk_tokens x vocab) rather than O(tokens x vocab) — what large-vocabulary sweeps need.
    """
    d = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, d)
    flat_targets, flat_mask = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    tokens = flat_hidden.shape[0]
    chunk = min(chunk_tokens, tokens)
    padding = -tokens % chunk
    if padding:  # padded tokens carry mask 0, so they add nothing
        flat_hidden = jnp.pad(flat_hidden, ((0, padding), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, padding))
        flat_mask = jnp.pad(flat_mask, (0, padding))
    chunks = (flat_hidden.reshape(-1, chunk, d), flat_targets.reshape(-1, chunk), flat_mask.reshape(-1, chunk))

    @jax.checkpoint
    def chunk_sums(h: Array, t: Array, m: Array) -> tuple[Array, Array]:
        logits = jnp.dot(h, output_matrix.astype(h.dtype)).astype(jnp.float32)  # [chunk, vocab]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logits = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jnp.sum((log_z - target_logits) * m), jnp.sum(jnp.square(log_z) * m)

    def body(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array], None]:
        nll, z = chunk_sums(*inputs)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), chunks)
    count = jnp.sum(flat_mask)
    denominator = jnp.maximum(count, 1.0)
    ce, z_loss = nll / denominator, z_sum / denominator
    return ce + z_loss_weight * z_loss, {"loss": ce, "z_loss": z_loss, "nll": nll, "tokens": count}
