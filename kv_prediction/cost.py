"""What the TTFT path costs: analytic forward FLOPs to the first token, next to the base model alone.

    KVP:       A on prompt[:-1] (no output layer) + P on N-1 tokens + B on the last token (N keys, its logits)
    base-only: B on the whole prompt (causal), logits for the last token only

lm_core.flops conventions (matmuls only, 2 FLOPs per multiply-add). The path itself: kv_prediction.serving.
"""

from __future__ import annotations

import dataclasses

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.flops import flops_per_token


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
