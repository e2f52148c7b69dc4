"""lm_core <-> Hugging Face Llama / Mistral / Qwen3: the config fields and the tensor names and layouts.

The two compute the same function once these conventions are bridged (tests/test_hf_interop.py proves it
against `transformers`):
- kernels: ours are [in, ..., out] with separate head axes (q, k, v [d_model, heads, head_dim]; o [heads,
  head_dim, d_model]); HF Linear weights are [out, in] with heads flattened. Each is the other's transpose once
  the head axes are merged (`to_hf` / `to_ours`), a view, so an import can slice it lazily.
- our default models multiply the input embedding by sqrt(d_model) (`ModelConfig.scale_embeddings`); Llama does
  not, so an export stores the scaled table as `embed_tokens`, and a tied model becomes an untied HF one whose
  `lm_head` is the unscaled table. An imported model keeps HF's convention (scale_embeddings=False), so export
  after import gives back the same bits.
- QK-norm (Qwen3: per head_dim, before RoPE), rotate-half RoPE and Llama 3.1's RoPE scaling are the same maths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from lm_core.config import ModelConfig
from lm_core.errors import UserError

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Our per-layer parameter (path inside one block) -> (HF name inside `model.layers.<i>.`, layout).
# Layouts: "vector" is copied; "heads_in" ([d, heads, head_dim] ours), "heads_out" ([heads, head_dim, d] ours)
# and "matrix" ([in, out] ours) are transposes of HF's [out, in] (see `to_hf`).
LAYER_TENSORS = {
    ("attention", "query_proj"): ("self_attn.q_proj.weight", "heads_in"),
    ("attention", "key_proj"): ("self_attn.k_proj.weight", "heads_in"),
    ("attention", "value_proj"): ("self_attn.v_proj.weight", "heads_in"),
    ("attention", "out_proj"): ("self_attn.o_proj.weight", "heads_out"),
    ("attention", "query_norm", "scale"): ("self_attn.q_norm.weight", "vector"),
    ("attention", "key_norm", "scale"): ("self_attn.k_norm.weight", "vector"),
    ("attention_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("ffn_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("ffn", "gate"): ("mlp.gate_proj.weight", "matrix"),
    ("ffn", "up"): ("mlp.up_proj.weight", "matrix"),
    ("ffn", "down"): ("mlp.down_proj.weight", "matrix"),
}
_QK_NORM = {("attention", "query_norm", "scale"), ("attention", "key_norm", "scale")}  # Qwen3 only
# Values of HF config fields we cannot represent, refused by name on import.
_MUST_BE = {"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None),
            "partial_rotary_factor": (1, 1.0, None), "quantization_config": (None,)}


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor and the lm_core parameter it is: `path` in the unrolled model, `layer` (None for global)."""

    hf_name: str
    path: tuple[Any, ...]
    layout: str


def tensor_mappings(config: ModelConfig, *, hf_tied: bool) -> list[TensorMapping]:
    """Every HF tensor of a model of this config, in HF's order; `hf_tied` leaves out `lm_head.weight`."""
    per_layer = [(path, name, layout) for path, (name, layout) in LAYER_TENSORS.items()
                 if config.qk_norm or path not in _QK_NORM]
    mappings = [TensorMapping("model.embed_tokens.weight", ("embedding", "table"), "vector")]
    for layer in range(config.num_layers):
        mappings += [TensorMapping(f"model.layers.{layer}.{name}", ("blocks", layer, *path), layout)
                     for path, name, layout in per_layer]
    mappings.append(TensorMapping("model.norm.weight", ("final_norm", "scale"), "vector"))
    if not hf_tied:
        mappings.append(TensorMapping("lm_head.weight", ("output",), "matrix"))
    return mappings


def to_hf(ours: np.ndarray, layout: str) -> np.ndarray:
    """Our parameter -> HF's tensor: merge the head axes into a matrix [in, out], then transpose to [out, in]."""
    if layout == "vector":
        return ours
    if layout == "heads_out":  # [heads, head_dim, d] -> [heads*head_dim, d]
        return ours.reshape(-1, ours.shape[-1]).T
    return ours.reshape(ours.shape[0], -1).T  # heads_in [d, heads, head_dim] / matrix [in, out]


def to_ours(hf: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF's tensor -> our parameter of `shape`, as a view when `hf` is one (transpose, then split head axes)."""
    return hf if layout == "vector" else hf.T.reshape(shape)


def export_config(config: ModelConfig, *, dtype: str, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """The `config.json` of the HF model computing our model's function (Qwen3 when QK-norm is on, else Llama).

    special_ids: bos_token_id / eos_token_id / pad_token_id of the tokenizer exported with it."""
    refuse_unexportable(config)
    family = "qwen3" if config.qk_norm else "llama"
    rope_scaling = None if config.rope_scaling == "none" else {
        "rope_type": "llama3", "factor": config.rope_scaling_factor, "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_len}
    values = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, **(rope_scaling or {})},
        # A tied model whose inputs are scaled by sqrt(d) has two different matrices in HF's convention.
        "tie_word_embeddings": config.tie_embeddings and not config.scale_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype, **special_ids,
    }
    if family == "llama":
        values.update(mlp_bias=False, pretraining_tp=1)
    else:
        values.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    return values


def refuse_unexportable(config: ModelConfig) -> None:
    if config.norm_placement != "pre":
        raise UserError(f"model.norm_placement={config.norm_placement!r} (Chameleon's post-norm) has no Hugging "
                        "Face Llama/Qwen3 equivalent; valid for export: 'pre'")


def export_tensors(config: ModelConfig, params: dict[tuple, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) of every exported tensor, from our unrolled parameters {path: array}."""
    hf_tied = config.tie_embeddings and not config.scale_embeddings
    for mapping in tensor_mappings(config, hf_tied=hf_tied):
        if mapping.path == ("embedding", "table"):
            table = params[mapping.path]
            scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
            yield mapping.hf_name, (table * np.asarray(scale, table.dtype)) if scale != 1.0 else table
        elif mapping.path == ("output",) and config.tie_embeddings:
            yield mapping.hf_name, params[("embedding", "table")]  # tied: the unscaled table is the output layer
        else:
            yield mapping.hf_name, to_hf(params[mapping.path], mapping.layout)


def import_config(hf: dict[str, Any], *, max_seq_len: int | None, param_dtype: str) -> ModelConfig:
    """Our ModelConfig for a HF Llama / Mistral / Qwen3 `config.json`; UserError naming any field we cannot
    represent. max_seq_len defaults to max_position_embeddings (capped by a sliding window, which must not bind)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"config.json model_type={family!r} is not supported; valid: {sorted(FAMILIES)}")
    for field, allowed in _MUST_BE.items():
        if hf.get(field) not in allowed:
            raise UserError(f"config.json {field}={hf.get(field)!r} cannot be represented by lm_core; valid: "
                            f"{[a for a in allowed if a is not None]}")
    heads = int(hf["num_attention_heads"])
    length = int(max_seq_len or hf.get("max_position_embeddings", 2048))
    _refuse_binding_window(hf, length)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), d_ff=int(hf["intermediate_size"]),
        max_seq_len=length, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=family == "qwen3",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), scale_embeddings=False, param_dtype=param_dtype,
        dtype=param_dtype, **_rope_fields(hf))


def _refuse_binding_window(hf: dict[str, Any], length: int) -> None:
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", hf.get("model_type") == "mistral")
    if uses_window and window is not None and int(window) < length:
        raise UserError(f"config.json sliding_window={window} is shorter than max_seq_len={length} and lm_core "
                        f"attention has no sliding window; valid: --max_seq_len <= {window}")


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and Llama 3.1 scaling from transformers 4's rope_theta/rope_scaling or 5's rope_parameters."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or parameters)
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise UserError(f"config.json rope scaling type {kind!r} cannot be represented by lm_core; valid: "
                        "default, llama3")
    return {"rope_theta": theta, "rope_scaling": "llama3", "rope_scaling_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_len": int(scaling["original_max_position_embeddings"])}


def import_shape(config: ModelConfig, mapping: TensorMapping) -> tuple[int, ...]:
    """The HF tensor shape `mapping` must have for a model of `config` (checked before anything is written)."""
    d, vocab, hd = config.d_model, config.vocab_size, config.head_dim
    leaf = mapping.path[-2:] if mapping.path[0] == "blocks" else mapping.path
    shapes = {
        ("attention", "query_proj"): (config.num_heads * hd, d), ("attention", "key_proj"):
            (config.num_kv_heads * hd, d), ("attention", "value_proj"): (config.num_kv_heads * hd, d),
        ("attention", "out_proj"): (d, config.num_heads * hd), ("query_norm", "scale"): (hd,),
        ("key_norm", "scale"): (hd,), ("attention_norm", "scale"): (d,), ("ffn_norm", "scale"): (d,),
        ("ffn", "gate"): (config.d_ff, d), ("ffn", "up"): (config.d_ff, d), ("ffn", "down"): (d, config.d_ff),
        ("embedding", "table"): (vocab, d), ("final_norm", "scale"): (d,), ("output",): (vocab, d),
    }
    return shapes[leaf]
