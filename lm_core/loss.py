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


def next_token_loss(model: Any, batch: Batch, rng: Array | None = None, *, z_loss_weight: float = 0.0
                    ) -> tuple[Array, dict[str, Array]]:
    """The standard language-model loss over a packed batch (keys as produced by `lm_core.data`).

    `rng` is unused here; it is part of the loss-function signature `(model, batch, rng)` that the train step
    calls, for losses that need randomness (router noise, sampling).
    """
    del rng
    output = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    loss, metrics = cross_entropy(output.logits, batch["targets"], batch["loss_mask"], z_loss_weight)
    aux_losses = [value for layer in output.aux for name, value in layer.items() if name.endswith("_loss")]
    if aux_losses:
        # FFN seams report extra losses as "<name>_loss" entries of their aux dict; they join the objective.
        aux_total = sum(aux_losses)
        loss = loss + aux_total
        metrics["aux_loss"] = aux_total
    return loss, metrics
