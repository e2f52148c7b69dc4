"""The auxiliary model A: a smaller transformer that reads the prompt in place of the base.

Two ways to get one (paper §"Parts"):
- canonical (KVP-C): any smaller `ModelConfig` with the base's vocabulary, built as `Transformer(aux_config, ...)`
  (and usually loaded from its own pretraining run);
- layer-pruned (KVP-LP): a copy of the base that keeps layers at regular intervals (`build_layer_pruned`).
`validate_pair` says whether a (base, aux) pair makes sense for KV prediction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.flops import param_counts
from lm_core.model import Transformer


def layer_pruned_indices(num_layers: int, keep_fraction: float) -> list[int]:
    """Base layers an LP aux keeps: round(num_layers·keep_fraction) of them, evenly spaced, starting at layer 0.

    Layer k of the aux is base layer floor(k·num_layers / kept): 0.75 keeps 3 of every 4 ([0,1,2,4,5,6,...],
    dropping 3, 7, ...), 0.50 the even layers, 0.25 every 4th — the lists of the paper's OpenELM LP models.
    """
    if not isinstance(keep_fraction, int | float) or not 0 < keep_fraction < 1:
        raise UserError(f"keep_fraction={keep_fraction!r} is invalid; valid: a number in (0, 1), e.g. 0.25, 0.5, "
                        "0.75")
    kept = round(num_layers * keep_fraction)
    if not 1 <= kept < num_layers:
        raise UserError(f"keep_fraction={keep_fraction} of num_layers={num_layers} keeps {kept} layers; valid: "
                        f"a fraction keeping between 1 and {num_layers - 1} layers")
    return [k * num_layers // kept for k in range(kept)]


def layer_pruned_config(base_config: ModelConfig, keep_fraction: float) -> ModelConfig:
    """The base's config with only the kept layers (same width, heads, vocabulary)."""
    return base_config.replace(num_layers=len(layer_pruned_indices(base_config.num_layers, keep_fraction)))


def _copied(tree: nnx.State) -> nnx.State:
    # Fresh buffers: A trains separately from the frozen B, and a donated train state must not alias arrays.
    return jax.tree.map(jnp.copy, tree)


def build_layer_pruned(base_model: Transformer, keep_fraction: float, rngs: nnx.Rngs) -> Transformer:
    """An LP aux initialised from the base: kept blocks, embedding, final norm and output layer are copies.

    `rngs` only drives the construction of the (dense) aux; every parameter is then overwritten by a copy.
    """
    kept = layer_pruned_indices(base_model.config.num_layers, keep_fraction)
    aux = Transformer(layer_pruned_config(base_model.config, keep_fraction), rngs=rngs)
    nnx.update(aux.embedding, _copied(nnx.state(base_model.embedding)))
    for aux_layer, base_layer in enumerate(kept):
        aux.set_block_state(aux_layer, _copied(base_model.block_state(base_layer)))
    nnx.update(aux.final_norm, _copied(nnx.state(base_model.final_norm)))
    if not base_model.config.tie_embeddings:
        aux.output.set_value(jnp.copy(base_model.output.get_value()))
    return aux


def validate_pair(base_config: ModelConfig, aux_config: ModelConfig) -> None:
    """UserError unless the aux is strictly smaller than the base and reads the same tokens.

    "Smaller" means fewer parameters (`lm_core.flops.param_counts(...).total`) and no more layers: a KV predictor
    maps every base layer from an EARLIER-or-same aux layer, and an aux as costly as the base cannot cut TTFT.
    """
    if aux_config.vocab_size != base_config.vocab_size:
        raise UserError(f"auxiliary vocab_size={aux_config.vocab_size} differs from the base's "
                        f"vocab_size={base_config.vocab_size}; both models must read the same tokens")
    if aux_config.num_layers > base_config.num_layers:
        raise UserError(f"auxiliary num_layers={aux_config.num_layers} exceeds the base's "
                        f"num_layers={base_config.num_layers}; valid: at most {base_config.num_layers}")
    aux_params, base_params = param_counts(aux_config).total, param_counts(base_config).total
    if aux_params >= base_params:
        raise UserError(f"the auxiliary model ({aux_params:,} parameters) is not smaller than the base "
                        f"({base_params:,}); use fewer layers, a narrower d_model or fewer heads")
