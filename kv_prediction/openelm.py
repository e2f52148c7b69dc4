"""The paper's models as OpenELM builds them, for the paper's TTFT FLOPs reductions.

OpenELM scales its layers with depth: layer i of L has a query width of (0.5 + 0.5·i/(L-1))·d_model and an FFN
width of (0.5 + 3.5·i/(L-1))·d_model (each rounded to OpenELM's divisors), with one K,V head per 4 query heads
and a tied 32,000-token embedding. lm_core's layers are uniform, so `experiments/configs/kvp_paper.py` only
approximates these models; this module has their real shapes.

The paper's FLOPs reductions are per-token forward costs, t_B(1) / t_A(1) with t(1) = 2 x (layer weights + output
layer): computed from the shapes below they come out at 2.36 / 3.98 / 1.34 / 1.93 / 3.60 for KVP-C-450M,
KVP-C-270M, KVP-LP-0.75 / 0.50 / 0.25, the paper's numbers (`PAPER_REDUCTIONS`). Our TTFT FLOPs
(`kv_prediction.cost.ttft_flops`) count a prompt's actual path instead (the aux computes no logits, the
predictor and the base's last token are added), so they differ from this convention by a few percent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kv_prediction.auxiliary import layer_pruned_indices

VOCAB_SIZE = 32_000
HEAD_DIM = 64
GQA_GROUPS = 4  # query heads per K,V head
QKV_MULTIPLIERS = (0.5, 1.0)
FFN_MULTIPLIERS = (0.5, 4.0)
FFN_DIVISOR = 256
# (layers, d_model) of the paper's OpenELM models
SIZES = {"1.1B": (28, 2048), "450M": (20, 1536), "270M": (16, 1280)}
# The paper's TTFT FLOPs reductions for the 1.1B base, by our auxiliary spec (c<d_model>x<layers>, lp<fraction>)
PAPER_REDUCTIONS = {"c1536x20": 2.36, "c1280x16": 3.98, "lp0.75": 1.34, "lp0.50": 1.93, "lp0.25": 3.60}


@dataclasses.dataclass(frozen=True)
class Layer:
    query_heads: int
    kv_heads: int
    d_ff: int


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding: the nearest multiple of `divisor`, at least `divisor`, never more than 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def openelm_layers(num_layers: int, d_model: int) -> list[Layer]:
    """Every layer's widths under OpenELM's layer-wise scaling."""
    qkv = [round(float(v), 2) for v in np.linspace(*QKV_MULTIPLIERS, num_layers)]
    ffn = [round(float(v), 2) for v in np.linspace(*FFN_MULTIPLIERS, num_layers)]
    layers = []
    for q_multiplier, ffn_multiplier in zip(qkv, ffn, strict=True):
        query_heads = make_divisible(d_model * q_multiplier, HEAD_DIM * GQA_GROUPS) // HEAD_DIM
        layers.append(Layer(query_heads, query_heads // GQA_GROUPS, make_divisible(ffn_multiplier * d_model,
                                                                                 FFN_DIVISOR)))
    return layers


def layer_weights(layer: Layer, d_model: int) -> int:
    """q, k, v and output projections plus the SwiGLU FFN's three matrices."""
    attention = d_model * (layer.query_heads + 2 * layer.kv_heads) * HEAD_DIM + layer.query_heads * HEAD_DIM * d_model
    return attention + 3 * d_model * layer.d_ff


def forward_flops_per_token(layers: list[Layer], d_model: int) -> float:
    """2 x (every layer's weights + the output layer): the paper's t(1)."""
    return 2.0 * (sum(layer_weights(layer, d_model) for layer in layers) + VOCAB_SIZE * d_model)


def paper_flops_reduction(spec: str, base: str = "1.1B") -> float:
    """t_B(1) / t_A(1) for an auxiliary spec of the paper ("c1536x20" canonical, "lp0.50" layer-pruned)."""
    base_layers, base_width = SIZES[base]
    base_model = openelm_layers(base_layers, base_width)
    if spec.startswith("lp"):
        aux_model = [base_model[i] for i in layer_pruned_indices(base_layers, float(spec[2:]))]
        aux_width = base_width
    else:
        aux_width, aux_layers = (int(part) for part in spec[1:].split("x"))
        aux_model = openelm_layers(aux_layers, aux_width)
    return forward_flops_per_token(base_model, base_width) / forward_flops_per_token(aux_model, aux_width)
