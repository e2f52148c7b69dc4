"""`KVPModel`: frozen base B + auxiliary A + KV predictor P, the three parts KV-prediction training sees.

    tokens -> A (return_kv) -> P -> predicted K,V of every base layer -> B (injected_kv) -> base logits
    tokens -> B (no gradient) -> true K,V                              (the consistency target)

How the base stays frozen, twice over:
1. `frozen_base()` is a view of B whose parameters pass through `jax.lax.stop_gradient`, so the gradient of every
   base parameter is exactly zero while gradients still flow THROUGH B's activations into P and A;
2. the optimizer must not move B either (AdamW's weight decay would, even at zero gradient): `freeze_base` in
   `kv_prediction.optim` wraps any optax optimizer so base parameters get a zero update and no optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
from flax import nnx

from kv_prediction.auxiliary import build_layer_pruned, validate_pair
from kv_prediction.layer_map import default_layer_map, layer_pruned_layer_map
from kv_prediction.predictor import KVPredictor
from lm_core.attention import LayerKV
from lm_core.model import ModelOutput, Transformer

Array = jax.Array
BASE = "base"  # attribute (and parameter-path prefix) of the frozen base model


class KVPOutput(NamedTuple):
    # final-normed hidden states [batch, seq, d], before the output layer (the loss computes logits, in chunks
    # when asked: `base.logits(base_hidden)` gives them)
    base_hidden: Array  # B run on the predicted K,V of every layer
    aux_hidden: Array  # A on its own
    predicted_kv: tuple[LayerKV, ...]  # n_base x [batch, seq, kv_heads_B, head_dim_B], pre-QK-norm, pre-RoPE
    true_kv: tuple[LayerKV, ...]  # the same shapes, from a no-gradient pass of B


class KVPModel(nnx.Module):
    def __init__(self, base: Transformer, aux: Transformer, *, rngs: nnx.Rngs,
                 layer_map: Sequence[int] | None = None, identity_when_square: bool = True):
        """`layer_map[i]` is the aux layer predicting base layer i (default: `default_layer_map`).

        `base` and `aux` must share no arrays (see `build_layer_pruned`): the train state is donated.
        """
        validate_pair(base.config, aux.config)
        if layer_map is None:
            layer_map = default_layer_map(base.config.num_layers, aux.config.num_layers)
        self.base = base
        self.aux = aux
        self.predictor = KVPredictor(base.config, aux.config, layer_map, rngs=rngs,
                                     identity_when_square=identity_when_square)

    @classmethod
    def layer_pruned(cls, base: Transformer, keep_fraction: float, *, rngs: nnx.Rngs) -> KVPModel:
        """KVP-LP: aux = the base's kept layers (copied), layer map = the paper's LP list."""
        aux = build_layer_pruned(base, keep_fraction, rngs)
        return cls(base, aux, rngs=rngs, layer_map=layer_pruned_layer_map(base.config.num_layers, keep_fraction))

    @property
    def num_base_layers(self) -> int:
        return self.base.config.num_layers

    def frozen_base(self) -> Transformer:
        """The base with stop-gradient parameters: zero gradients for B, gradients through B still flow."""
        graphdef, state = nnx.split(self.base)
        return nnx.merge(graphdef, jax.lax.stop_gradient(state))

    def predict_kv(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None
                   ) -> tuple[LayerKV, ...]:
        """Predicted base K,V for `tokens` [batch, seq] (the TTFT path: A's output layer is skipped)."""
        return self.predictor(self.aux.hidden_states(tokens, positions=positions, segment_ids=segment_ids).kv)

    def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None
                 ) -> ModelOutput:
        """The KVP language model: B's logits with every layer on predicted K,V (`kv` = those predictions).

        This is what `lm_core.trainer`'s evaluation calls as `model(inputs, positions=..., segment_ids=...)`.
        """
        predicted = self.predict_kv(tokens, positions=positions, segment_ids=segment_ids)
        out = self.frozen_base()(tokens, positions=positions, segment_ids=segment_ids, injected_kv=predicted)
        return out._replace(kv=predicted)

    def forward_train(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None
                      ) -> KVPOutput:
        """Everything the 3-term loss needs from one batch; tokens, positions, segment_ids: [batch, seq]."""
        aux = self.aux.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
        predicted = self.predictor(aux.kv)
        base = self.frozen_base()
        base_hidden = base.hidden_states(tokens, positions=positions, segment_ids=segment_ids, injected_kv=predicted,
                                         return_kv=False).hidden
        true_kv = base.hidden_states(tokens, positions=positions, segment_ids=segment_ids).kv
        return KVPOutput(base_hidden, aux.hidden, predicted, jax.lax.stop_gradient(true_kv))
