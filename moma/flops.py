"""Analytic FLOPs of MoMa variants, in lm_core.flops' conventions (matmuls only, a multiply-add = 2 FLOPs,
forward FLOPs per token; training = 3 x forward).

Active FFN FLOPs: expert choice with capacity factor c gives each token c experts on average, each a full SwiGLU,
so a routed group costs c x the dense FFN (plus its router, 2·d·|group| per token); a one-expert group (1t1i) is a
dense FFN plus its one-column gate (2·d). At c = 1 every variant is dense-matched up to the routers, which is the
paper's claim.

Mixture of depths: a MoD layer's projections and FFN run on a c_d share of the tokens, and each selected token
attends to the selected keys of its row only (about c_d of them), so its attention scores cost c_d² of a full
layer's; every token pays the 2·d MoD router. `compute_matched_mod_layers` picks the depth whose FLOPs per token
are nearest the non-MoD model's: the paper's 8 -> 14 and 24 -> 40 layers at 90M and 435M.

These count what the routing ALLOTS (the paper's accounting). What the static slot arrays execute is
`executed_expert_overhead` x the expert part.
"""

from __future__ import annotations

import dataclasses

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.flops import FlopsPerToken, attended_keys, flops_per_token
from moma.depths import mod_layers
from moma.variants import MoMaConfig


def group_shares(image_fraction: float = 0.5) -> dict[str, float]:
    """Share of a batch's tokens each group serves when `image_fraction` of the tokens are image codes."""
    if not 0 <= image_fraction <= 1:
        raise UserError(f"image_fraction={image_fraction} must be in [0, 1]")
    return {"text": 1 - image_fraction, "image": image_fraction, "mixed": 1.0}


def ffn_layer_flops(config: ModelConfig, moma: MoMaConfig, image_fraction: float = 0.5) -> float:
    """Forward FLOPs per token of one MoMa FFN layer (routers included), averaged over the modality mix."""
    swiglu = 2.0 * 3 * config.d_model * config.d_ff
    if moma.is_dense:
        return swiglu
    shares = group_shares(image_fraction)
    total = 0.0
    for name, experts in moma.groups.items():
        capacity = moma.capacity_factor if experts > 1 else 1.0  # a one-expert group takes every token once
        total += shares[name] * (capacity * swiglu + 2.0 * config.d_model * experts)
    return total


def moma_flops_per_token(config: ModelConfig, moma: MoMaConfig, seq_len: int, image_fraction: float = 0.5
                         ) -> FlopsPerToken:
    """Forward FLOPs per token of a MoMa model (`ffn` includes the MoE and MoD routers)."""
    dense = flops_per_token(config, seq_len)
    layers = config.num_layers
    projections, scores = dense.attention_projections / layers, dense.attention_scores / layers
    ffn = ffn_layer_flops(config, moma, image_fraction)
    total = FlopsPerToken(layers * projections, layers * scores, layers * ffn, dense.output_layer)
    if not moma.mod:
        return total
    c, n_mod = moma.mod_capacity, len(mod_layers(layers))
    # a selected token attends to ~c·seq_len selected keys of its row instead of all seq_len
    mod_scores = c * scores * (c * seq_len + 1) / 2 / attended_keys(seq_len)
    return FlopsPerToken(
        attention_projections=total.attention_projections - n_mod * (1 - c) * projections,
        attention_scores=total.attention_scores - n_mod * (scores - mod_scores),
        ffn=total.ffn - n_mod * (1 - c) * ffn + n_mod * 2.0 * config.d_model,
        output_layer=total.output_layer,
    )


def compute_matched_mod_layers(config: ModelConfig, moma: MoMaConfig, seq_len: int,
                               image_fraction: float = 0.5) -> int:
    """Depth of the MoD model whose forward FLOPs per token are nearest the same variant without MoD at
    `config.num_layers` (ties go to the deeper model)."""
    target = moma_flops_per_token(config, dataclasses.replace(moma, mod=False), seq_len, image_fraction).forward
    mod = dataclasses.replace(moma, mod=True)

    def distance(layers: int) -> float:
        return abs(moma_flops_per_token(config.replace(num_layers=layers), mod, seq_len, image_fraction).forward
                   - target)

    return min(range(config.num_layers, 8 * config.num_layers + 1), key=lambda n: (distance(n), -n))


def executed_expert_overhead(moma: MoMaConfig, image_fraction: float = 0.5) -> float:
    """Expert slots the static slot arrays compute per token allotted by the routing (>= 1; 1 = no waste).

    Each group computes capacity · max_fraction · T slots for capacity · share · T allotted ones; with the default
    max_fraction 1.0 a two-modality variant computes 2x what it needs (see moma.experts).
    """
    if moma.is_dense:
        return 1.0
    shares = group_shares(image_fraction)
    capacity = {name: moma.capacity_factor if experts > 1 else 1.0 for name, experts in moma.groups.items()}
    executed = sum(capacity[name] * moma.max_fraction(name) for name in moma.groups)
    allotted = sum(capacity[name] * shares[name] for name in moma.groups)
    return executed / allotted
