"""Per-modality losses for lm_core's trainer: the text and image loss curves that FLOPs savings η are read from.

A target's modality decides which loss it counts in (image codes -> image; text, BOI/EOI, EOS -> text), as in
`moma.mixed_modal.per_modality_sums`. The training objective itself is the plain next-token loss over all targets
(the paper trains one early-fusion model on the mixed stream); the per-modality means are logged alongside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lm_core.loss import output_layer_loss, with_aux_losses
from moma.mixed_modal import MixedVocab, per_modality_sums

Array = jax.Array
Batch = dict[str, Array]
MODALITIES = ("text", "image")


def mixed_modal_loss(model: Any, batch: Batch, rng: Array | None = None, *, vocab: MixedVocab,
                     z_loss_weight: float = 0.0, chunk_tokens: int = 0) -> tuple[Array, dict[str, Array]]:
    """Next-token CE + z-loss over all targets, plus `text_loss` / `image_loss` (means over each modality's targets).

    Same objective as `lm_core.loss.next_token_loss` (FFN `*_loss` aux entries included, `chunk_tokens` > 0 for
    the output layer in chunks); the two per-modality means reuse the same logits. `rng` (the train step's key)
    reaches the routers as their noise when the config asks for it (upcycling, moma.routing.Router).
    """
    states = model.hidden_states(batch["inputs"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"), return_kv=False, rng=rng)
    aux = states.aux
    mask = batch["loss_mask"].astype(jnp.float32)  # [batch, seq]
    is_image = vocab.is_image_token(batch["targets"]).astype(jnp.float32)  # [batch, seq]
    loss, metrics = output_layer_loss(model, states.hidden, batch["targets"], mask, z_loss_weight, chunk_tokens,
                                      {"text": mask * (1 - is_image), "image": mask * is_image})
    loss, metrics = with_aux_losses(loss, metrics, aux)
    overflows = [value for layer in aux for name, value in layer.items() if name.endswith("_slot_overflow")]
    if overflows:  # > 0 only when a batch exceeds a max_*_fraction bound: those expert picks were clipped
        metrics["slot_overflow"] = jnp.max(jnp.stack(overflows))
    return loss, {**metrics, **routing_layer_means(aux)}


# Routing statistics logged per step (moma.experts.routing_statistics, moma.depths.MoDBlock): which share of a
# group's tokens got any expert, how many experts a token got, which share of tokens a MoD layer kept.
ROUTING_SUFFIXES = ("_routed_fraction", "_experts_per_token", "_selected_fraction")


def routing_layer_means(aux: tuple[dict[str, Array], ...]) -> dict[str, Array]:
    """Each routing statistic averaged over the layers that report it, e.g. `image_routed_fraction`: an expert
    group whose tokens go without any FFN shows it here from the first steps on."""
    per_layer: dict[str, list[Array]] = {}
    for layer in aux:
        for name, value in layer.items():
            if name.endswith(ROUTING_SUFFIXES) and jnp.ndim(value) == 0:
                per_layer.setdefault(name, []).append(value)
    return {name: jnp.mean(jnp.stack(values)) for name, values in per_layer.items()}


def per_modality_eval_sums(vocab: MixedVocab) -> Callable[[Array, Batch], dict[str, Array]]:
    """The trainer's `Evaluation.sums`: summed NLL and target counts per modality of each evaluation batch."""

    def sums(logits: Array, batch: Batch) -> dict[str, Array]:
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, seq, vocab]
        nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]  # [batch, seq]
        return per_modality_sums(nll, batch["targets"], batch["loss_mask"].astype(jnp.float32), vocab)

    return sums


def per_modality_eval_row(summary: dict[str, float]) -> dict[str, float]:
    """The trainer's `Evaluation.row`: eval_text_loss / eval_image_loss from the per-token sums it computed.

    The trainer divides every summed statistic by the total token count; the ratio of two such means is the mean
    over one modality's targets. The intermediate entries are dropped, the modality shares kept, and bits per
    character too: it would divide image-code NLL by caption characters.
    """
    row = dict(summary)
    row.pop("eval_bpc", None)
    for name in MODALITIES:
        loss_sum, tokens = row.pop(f"eval_{name}_loss_sum", None), row.pop(f"eval_{name}_tokens", None)
        if loss_sum is not None and tokens:
            row[f"eval_{name}_loss"] = loss_sum / tokens
            row[f"eval_{name}_share"] = tokens
    return row
