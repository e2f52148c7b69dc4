"""Next-token cross-entropy with z-loss: the loss most experiments start from."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lm_core.sharding import traced_batch_shards

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
    so the [tokens, vocab] logits never exist at once. `rng` (the train step's key, None at evaluation) is lent to
    the layers (`TokenContext.rng`): a dense model reads none of it, a paper's FFN may (MoMa's router noise).
    """
    states = model.hidden_states(batch["inputs"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"), return_kv=False, rng=rng)
    loss, metrics = output_layer_loss(model, states.hidden, batch["targets"], batch["loss_mask"], z_loss_weight,
                                      chunk_tokens)
    return with_aux_losses(loss, metrics, states.aux)


def with_aux_losses(loss: Array, metrics: dict[str, Array], aux: Any) -> tuple[Array, dict[str, Array]]:
    """FFN seams report extra losses as "<name>_loss" entries of their per-layer aux dicts; they join the objective
    (and their sum is logged as metrics["aux_loss"])."""
    aux_losses = [value for layer in aux for name, value in layer.items() if name.endswith("_loss")]
    if aux_losses:
        metrics = dict(metrics, aux_loss=sum(aux_losses))
        loss = loss + metrics["aux_loss"]
    return loss, metrics


def output_layer_loss(model: Any, hidden: Array, targets: Array, mask: Array, z_loss_weight: float = 0.0,
                      chunk_tokens: int = 0, group_masks: dict[str, Array] | None = None
                      ) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy` of `model.logits(hidden)`, from final-normed hidden states [batch, seq, d].

    chunk_tokens > 0 never holds the whole [tokens, vocab] logits (`chunked_cross_entropy`); 0 computes them at
    once (the same numbers). `group_masks` {name: [batch, seq] mask} adds metrics[f"{name}_loss"], the mean NLL
    over that group's tokens (e.g. MoMa's text and image targets), from the same logits.
    """
    group_masks = group_masks or {}
    if chunk_tokens > 0:
        return chunked_cross_entropy(hidden, model.output_matrix(), targets, mask, z_loss_weight, chunk_tokens,
                                     group_masks)
    logits = model.logits(hidden)
    loss, metrics = cross_entropy(logits, targets, mask, z_loss_weight)
    for name, group_mask in group_masks.items():
        metrics[f"{name}_loss"] = cross_entropy(logits, targets, group_mask)[1]["loss"]
    return loss, metrics


def chunked_cross_entropy(hidden: Array, output_matrix: Array, targets: Array, mask: Array,
                          z_loss_weight: float = 0.0, chunk_tokens: int = 1024,
                          group_masks: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy` of `hidden @ output_matrix` without ever holding all the logits.

    hidden: [batch, seq, d]; output_matrix: [d, vocab]. `chunk_tokens` counts the tokens ONE DEVICE holds per
    chunk: with `local_rows` = the rows of a batch shard (all rows without a mesh), the sequence is cut into chunks
    of max(1, chunk_tokens // local_rows) positions, and each step of the loop takes one chunk of EVERY row, so a
    chunk keeps the batch axis (and its sharding over the data-parallel mesh axes: each device computes only its
    rows' logits; chunking the flattened tokens instead would make every device loop over every chunk). Counting
    per device keeps the loop short on a large mesh: each step gathers the FSDP-sharded output matrix and
    reduces its gradient, so a count per global batch would repeat that hundreds of times. Each chunk's logits are
    recomputed in the backward pass (jax.checkpoint) instead of stored, so memory for the output layer is
    O(chunk_tokens x vocab) per device rather than O(tokens x vocab). `group_masks` as in `output_layer_loss`.
    """
    names = sorted(group_masks or {})
    batch, seq, d = hidden.shape
    # row 0: the loss mask; row 1 + i: group i's mask
    masks = jnp.stack([mask] + [group_masks[n] for n in names]).astype(jnp.float32)  # [1 + groups, batch, seq]
    shards = traced_batch_shards()
    local_rows = batch // shards if batch % shards == 0 else batch
    chunk = max(1, min(seq, chunk_tokens // local_rows))
    padding = -seq % chunk
    if padding:  # padded positions carry mask 0, so they add nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padding)))
        masks = jnp.pad(masks, ((0, 0), (0, 0), (0, padding)))
    steps = (seq + padding) // chunk
    chunks = (hidden.reshape(batch, steps, chunk, d).swapaxes(0, 1),
              targets.reshape(batch, steps, chunk).swapaxes(0, 1),
              masks.reshape(len(names) + 1, batch, steps, chunk).transpose(2, 0, 1, 3))

    @jax.checkpoint
    def chunk_sums(h: Array, t: Array, m: Array) -> tuple[Array, Array]:
        # h [batch, chunk, d]; accumulated in float32 from bf16 operands, like Transformer.logits
        logits = jnp.einsum("bcd,dv->bcv", h, output_matrix.astype(h.dtype), preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]  # [batch, chunk]
        # [1 + groups] NLL sums (a multiply and sum, not a matmul: TPUs would round an f32 matmul to bf16), z sum
        return jnp.sum(m * nll, axis=(1, 2)), jnp.sum(jnp.square(log_z) * m[0])

    def body(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array], None]:
        nll, z = chunk_sums(*inputs)
        return (carry[0] + nll, carry[1] + z), None

    zeros = (jnp.zeros((len(names) + 1,), jnp.float32), jnp.zeros((), jnp.float32))
    (nll, z_sum), _ = jax.lax.scan(body, zeros, chunks)
    counts = jnp.sum(masks, axis=(1, 2))
    denominator = jnp.maximum(counts[0], 1.0)
    ce, z_loss = nll[0] / denominator, z_sum / denominator
    metrics = {"loss": ce, "z_loss": z_loss, "nll": nll[0], "tokens": counts[0]}
    metrics.update({f"{name}_loss": nll[1 + i] / jnp.maximum(counts[1 + i], 1.0) for i, name in enumerate(names)})
    return ce + z_loss_weight * z_loss, metrics
