"""`ModelConfig`: the shape of a decoder-only transformer, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from lm_core.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORM_PLACEMENTS = ("pre", "swin")
ROPE_SCALINGS = ("none", "llama3")
# How attention runs (lm_core/attention.py): "auto" picks per backend (resolve_attention_impl there).
ATTENTION_IMPLS = ("auto", "xla_blocked", "dot_product", "splash", "reference")
# What a rematerialised block keeps for the backward pass (lm_core/model.py REMAT_POLICIES): "none" = no remat.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "ffn_only")
# Fields that choose HOW the same function is computed, not WHICH function: a checkpoint written with one value
# restores under another (the parameter tree is the same), so checkpoint checks ignore them. `scan_layers` is not
# one of them: it computes the same function but stores the blocks stacked (lm_core.stacked), another tree.
EXECUTION_FIELDS = ("attention_impl", "remat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder. `head_dim` defaults to d_model // num_heads, `d_ff` to a SwiGLU-sized 8/3·d."""

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means "same as num_heads" (plain multi-head attention)
    head_dim: int = 0  # 0 means d_model // num_heads
    d_ff: int = 0  # 0 means the SwiGLU default, 8/3 * d_model rounded up to a multiple of 8
    max_seq_len: int = 128
    tie_embeddings: bool = True
    qk_norm: bool = False
    # "pre": x + attn(norm(x)) (Llama). "swin": x + norm(attn(x)) (Chameleon / MoMa).
    norm_placement: str = "pre"
    rope_theta: float = 10_000.0
    # "none", or "llama3": Llama 3.1's long-context rescaling of the rotary frequencies (lm_core.layers
    # rope_frequencies), with the four rope_* numbers below as in a Llama 3.1 config.json's "rope_scaling".
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-6
    # Multiply the input embedding by sqrt(d_model) (our models and Gemma; Llama, Mistral and Qwen do not).
    scale_embeddings: bool = True
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (f32 master weights with bf16 compute)
    # Recompute each block's activations in the backward pass to save memory; one of REMAT_POLICIES
    # (True / False are accepted as "full" / "none").
    remat: str = "none"
    # Store the blocks' parameters stacked and run the layers as one scan over them (lm_core.stacked): compile
    # time nearly independent of depth; checkpoints hold the stacked layout.
    scan_layers: bool = False
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        # Resolve the "0 means default" fields so every reader sees concrete numbers.
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if isinstance(self.remat, bool):  # the older on/off switch
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        problems = []
        if self.head_dim == 0 and _positive_int(self.num_heads) and _positive_int(self.d_model):
            if self.d_model % self.num_heads:
                problems.append(
                    f"d_model={self.d_model} is not divisible by num_heads={self.num_heads} "
                    "(or set head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", max(1, self.d_model // self.num_heads))
        if self.d_ff == 0 and _positive_int(self.d_model):
            object.__setattr__(self, "d_ff", _swiglu_width(self.d_model))
        problems += _problems(self)
        if problems:
            raise UserError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weights_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def differing_fields(self, other: ModelConfig, *, include_execution: bool = False) -> list[str]:
        """Names of fields whose values differ, e.g. to explain why a checkpoint does not fit.

        EXECUTION_FIELDS (attention kernel, remat) are skipped unless `include_execution`: they do not change the
        parameters or the function, so a checkpoint fits whatever they are set to.
        """
        mine, theirs = self.to_dict(), other.to_dict()
        return [name for name in mine if mine[name] != theirs[name]
                and (include_execution or name not in EXECUTION_FIELDS)]


def check_finite_numbers(values: dict[str, Any]) -> None:
    """Refuse NaN or infinity anywhere in a (nested) config dict, naming the field: range checks such as
    `value < 0` let NaN through, and every numeric field of a run is meant to be finite."""
    for name, value in _float_fields(values):
        if not math.isfinite(value):
            raise UserError(f"{name}={value} must be a finite number")


def _float_fields(values: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _float_fields(value, f"{prefix}{key}.")
    elif isinstance(values, (list, tuple)):
        for index, value in enumerate(values):
            yield from _float_fields(value, f"{prefix.rstrip('.')}[{index}].")
    elif isinstance(values, float) or (getattr(getattr(values, "dtype", None), "kind", "") == "f"
                                       and getattr(values, "size", 0) == 1):  # numpy float scalars
        yield prefix.rstrip("."), float(values)


def _swiglu_width(d_model: int) -> int:
    # Llama's rule: a SwiGLU FFN with hidden 8/3·d has the parameters of a 4·d GELU FFN.
    return max(8, -(-(8 * d_model) // 3 // 8) * 8)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _problems(config: ModelConfig) -> list[str]:
    problems = []
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                 "max_seq_len"):
        value = getattr(config, name)
        if not _positive_int(value):
            problems.append(f"{name}={value!r} must be a positive integer")
    if problems:
        return problems
    if config.num_heads % config.num_kv_heads:
        problems.append(f"num_kv_heads={config.num_kv_heads} must divide num_heads={config.num_heads}")
    if config.head_dim % 2:
        problems.append(f"head_dim={config.head_dim} must be even for rotary embeddings")
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) not in DTYPES:
            problems.append(f"{name}={getattr(config, name)!r} is unknown; valid: {sorted(DTYPES)}")
    if config.attention_impl not in ATTENTION_IMPLS:
        problems.append(f"attention_impl={config.attention_impl!r} is unknown; valid: {list(ATTENTION_IMPLS)}")
    if config.remat not in REMAT_POLICIES:
        problems.append(f"remat={config.remat!r} is unknown; valid: {list(REMAT_POLICIES)}")
    if not isinstance(config.scan_layers, bool):
        problems.append(f"scan_layers={config.scan_layers!r} must be true or false")
    if config.norm_placement not in NORM_PLACEMENTS:
        problems.append(f"norm_placement={config.norm_placement!r} is unknown; valid: {list(NORM_PLACEMENTS)}")
    for name in ("rope_theta", "norm_eps"):  # `not` a range: NaN fails every comparison, so it is refused too
        if not 0 < getattr(config, name) < float("inf"):
            problems.append(f"{name}={getattr(config, name)!r} must be a finite positive number")
    if not isinstance(config.scale_embeddings, bool):
        problems.append(f"scale_embeddings={config.scale_embeddings!r} must be true or false")
    return problems + _rope_scaling_problems(config)


def _rope_scaling_problems(config: ModelConfig) -> list[str]:
    if config.rope_scaling not in ROPE_SCALINGS:
        return [f"rope_scaling={config.rope_scaling!r} is unknown; valid: {list(ROPE_SCALINGS)}"]
    if config.rope_scaling == "none":
        return []
    problems = [f"{name}={getattr(config, name)!r} must be a finite positive number"
                for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor")
                if not 0 < getattr(config, name) < float("inf")]
    if not _positive_int(config.rope_original_max_len):
        problems.append(f"rope_original_max_len={config.rope_original_max_len!r} must be a positive integer")
    if not problems and config.rope_high_freq_factor <= config.rope_low_freq_factor:
        problems.append(f"rope_high_freq_factor={config.rope_high_freq_factor} must exceed "
                        f"rope_low_freq_factor={config.rope_low_freq_factor}")
    return problems
