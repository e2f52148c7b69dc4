"""Analytic parameter and FLOP counts of the decoder, and model FLOPs utilisation (MFU).

Conventions (the ones MFU numbers in the literature use, so ours can be compared with them):
- a multiply-add is 2 FLOPs; only matmuls are counted. RMSNorm, softmax, RoPE, SiLU, the residual adds and the
  embedding lookup (a gather, no arithmetic) are ignored: together they are O(d) per token against the O(d^2)
  of the projections, well under 1% at any realistic width;
- training = 3 x forward: the backward pass costs 2 x the forward (one matmul for the gradient of the
  activations, one for the gradient of the weights);
- rematerialisation is NOT counted: MFU counts the FLOPs the model needs, not those the implementation spends
  (that would be hardware FLOPs utilisation). The same holds for causal attention: the model computes the full
  [seq, seq] score matrix and masks half of it, but only the unmasked half is counted.

The counts describe the dense Llama-style `lm_core.model.Transformer`; a model built with another FFN factory
(MoE, MoD) needs its own accounting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp

from lm_core.config import ModelConfig

BACKWARD_TO_FORWARD = 2.0  # the backward pass costs 2 x the forward: dL/d(activations) and dL/d(weights)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts split the way the vocabulary-scaling paper (Tao et al. 2024) needs them.

    `vocab` is N_v = V·d, counted ONCE even when the output layer is untied: that paper's convention, because
    the input embedding costs no FLOPs and so only one V·d matrix enters the compute. `total` is the real number
    of parameters the model holds (both matrices when untied).
    """

    embedding: int  # V·d, the input embedding table
    output: int  # V·d when untied, 0 when the output layer reuses the embedding
    attention: int  # q, k, v and out projections of all layers
    ffn: int  # SwiGLU gate, up and down of all layers
    norms: int  # RMSNorm scales: 2 per layer (+ q and k norms with qk_norm) and the final norm

    @property
    def non_vocab(self) -> int:
        """N_nv: everything but the input embedding and the output layer."""
        return self.attention + self.ffn + self.norms

    @property
    def vocab(self) -> int:
        """N_v = V·d (once, tied or not)."""
        return self.embedding

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.non_vocab

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "non_vocab": self.non_vocab, "vocab": self.vocab, "total": self.total}


def param_counts(config: ModelConfig) -> ParamCounts:
    """Counts of `lm_core.model.Transformer(config)` parameters (no biases anywhere)."""
    d, hd, layers = config.d_model, config.head_dim, config.num_layers
    q_and_out = 2 * d * config.num_heads * hd  # q [d, H, hd] and out [H, hd, d]
    k_and_v = 2 * d * config.num_kv_heads * hd  # k and v [d, KV, hd]: GQA shrinks these
    norms_per_layer = 2 * d + (2 * hd if config.qk_norm else 0)  # swin or pre placement: same two norms
    vocab_matrix = config.vocab_size * d
    return ParamCounts(
        embedding=vocab_matrix,
        output=0 if config.tie_embeddings else vocab_matrix,
        attention=layers * (q_and_out + k_and_v),
        ffn=layers * 3 * d * config.d_ff,
        norms=layers * norms_per_layer + d,  # + the final norm
    )


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """FORWARD FLOPs per token, by part; `forward` is their sum and `training` = 3 x `forward`.

    attention_scores counts QK^T and (softmax)·V: 2·2·H·hd FLOPs per attended key per layer. With causal=True a
    token attends on average to (seq_len + 1) / 2 keys (token i of a row sees i + 1 keys, i = 0..seq_len-1), so
    the per-token cost is 4·H·hd·(seq_len + 1)/2 per layer; with causal=False it attends to all seq_len keys.
    Packed rows (several documents per row) are counted as if they were one document, the usual convention.
    """

    attention_projections: float  # q, k, v, out: 2·d·hd·(2·H + 2·KV) per layer
    attention_scores: float  # QK^T and AV: 4·H·hd·attended_keys per layer
    ffn: float  # SwiGLU gate, up, down: 2·3·d·ff per layer
    output_layer: float  # logits: 2·d·V

    @property
    def forward(self) -> float:
        return self.attention_projections + self.attention_scores + self.ffn + self.output_layer

    @property
    def training(self) -> float:
        """Forward + backward (2 x forward), the number MFU divides by."""
        return (1.0 + BACKWARD_TO_FORWARD) * self.forward

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "forward": self.forward, "training": self.training}


def attended_keys(seq_len: int, *, causal: bool = True) -> float:
    """Average number of keys one query attends to in a full row of `seq_len` tokens."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


def flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True) -> FlopsPerToken:
    """Forward FLOPs per token of the dense model on rows of `seq_len` tokens (see `FlopsPerToken`)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be a positive integer")
    d, hd, h, layers = config.d_model, config.head_dim, config.num_heads, config.num_layers
    projection_params = d * hd * (2 * h + 2 * config.num_kv_heads)
    return FlopsPerToken(
        attention_projections=2.0 * layers * projection_params,
        attention_scores=2.0 * 2 * layers * h * hd * attended_keys(seq_len, causal=causal),
        ffn=2.0 * layers * 3 * d * config.d_ff,
        output_layer=2.0 * d * config.vocab_size,
    )


def training_flops(config: ModelConfig, seq_len: int, tokens: float, *, causal: bool = True) -> float:
    """FLOPs to train on `tokens` tokens in rows of `seq_len`."""
    return flops_per_token(config, seq_len, causal=causal).training * tokens


def mfu(tokens_per_s: float, flops_per_token_training: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over peak FLOP/s.

    `tokens_per_s` and `peak_flops_per_s` must describe the same hardware: global tokens/s goes with the peak of
    all devices together (`total_peak_flops_per_s`), one device's tokens/s with one device's peak.
    """
    if not peak_flops_per_s > 0:
        raise ValueError(f"peak_flops_per_s={peak_flops_per_s} must be positive")
    return tokens_per_s * flops_per_token_training / peak_flops_per_s


# Published dense (no 2:4 sparsity) bf16 peak FLOP/s of ONE JAX device, keyed by a run of whole words of
# `device.device_kind` (lower case). The longest key that matches wins, so "tpu v5 lite" (v5e) beats "tpu v5"
# (what v5p reports) and "l40s" is never mistaken for "l4". TPU v2/v3 expose each of a chip's two TensorCores as
# a device, so their entries are half the per-chip figure (45 and 123 TFLOP/s per chip).
DEVICE_PEAK_FLOPS: dict[str, float] = {
    # NVIDIA (device_kind e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB")
    "v100": 125e12,  # SXM2, fp16 tensor cores (V100 has no bf16)
    "v100 pcie": 112e12,
    "a10": 125e12,
    "a100": 312e12,
    "l4": 121e12,
    "l40": 181e12,
    "l40s": 362e12,
    "h100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h200": 989e12,
    "h200 nvl": 835e12,
    "gh200": 989e12,
    "b200": 2250e12,
    # Google TPUs (device_kind e.g. "TPU v4", "TPU v5 lite")
    "tpu v2": 22.5e12,  # per TensorCore
    "tpu v3": 61.5e12,  # per TensorCore
    "tpu v4": 275e12,
    "tpu v4 lite": 138e12,  # v4i
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def _words(text: str) -> str:
    """' nvidia a100 sxm4 80gb ': lower case, one space between alphanumeric runs, padded, for whole-word match."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def table_peak_flops(device_kind: str) -> tuple[str, float] | None:
    """(matching key, peak FLOP/s) from `DEVICE_PEAK_FLOPS` for a device kind string, or None if none matches."""
    kind = _words(device_kind)
    matches = [key for key in DEVICE_PEAK_FLOPS if _words(key) in kind]
    if not matches:
        return None
    key = max(matches, key=lambda k: len(_words(k)))
    return key, DEVICE_PEAK_FLOPS[key]


def measure_matmul_flops_per_s(size: int = 2048, dtype: jax.typing.DTypeLike = jnp.float32, repeats: int = 5,
                               device: jax.Device | None = None) -> float:
    """Achieved FLOP/s of a jitted [size, size] x [size, size] matmul: 2·size^3 FLOPs over the FASTEST run.

    A big square matmul is the best case for any device, so this approximates a peak where no published number
    applies (CPUs). It runs once untimed first so compilation is not timed; the fastest of `repeats` is the
    estimate because other processes on the machine can only slow a run down (a median taken while something
    else ran gave MFU above 100%). size=2048 in float32 takes ~0.1 s per matmul on 2 CPU cores.
    """
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((size, size), dtype), device)  # [size, size]
    y = jax.device_put(jnp.full((size, size), 0.5, dtype), device)  # [size, size]
    matmul = jax.jit(jnp.matmul)
    matmul(x, y).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x, y).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2.0 * size**3 / max(min(seconds), 1e-12)


@functools.cache
def _measured_peak(device: jax.Device) -> float:
    # Measured once per process and device: a few seconds at most, and MFU needs one fixed denominator.
    if device.platform == "cpu":
        return measure_matmul_flops_per_s(2048, jnp.float32, device=device)
    # An accelerator missing from the table: bf16 like training, big enough that dispatch overhead is noise.
    return measure_matmul_flops_per_s(8192, jnp.bfloat16, device=device)


def peak_flops_per_s(device: jax.Device | None = None, *, measure: bool = True) -> tuple[float, str]:
    """(peak FLOP/s of ONE device, where that number came from).

    Devices in `DEVICE_PEAK_FLOPS` get the published figure ("table:<device_kind>"). Anything else (CPUs
    always) gets a measured matmul rate ("measured matmul (cpu)"), cached per process; with measure=False it
    gets nan instead, for callers that must not spend the time.
    """
    device = device or jax.devices()[0]
    found = None if device.platform == "cpu" else table_peak_flops(device.device_kind)
    if found is not None:
        return found[1], f"table:{device.device_kind}"
    if not measure:
        return math.nan, f"unknown:{device.device_kind} (not measured)"
    dtype = "float32" if device.platform == "cpu" else "bfloat16"
    return _measured_peak(device), f"measured matmul ({device.platform}, {dtype})"


def total_peak_flops_per_s(*, measure: bool = True) -> tuple[float, str]:
    """(peak FLOP/s of all devices of the job together, source): the denominator for GLOBAL tokens/s.

    Accelerators: one device's peak x `jax.device_count()`. CPU: the measured rate already uses every core of
    the host (and `--xla_force_host_platform_device_count` fake devices share those cores), so it is multiplied
    by the number of processes instead, assuming one process per host.
    """
    device = jax.devices()[0]
    peak, source = peak_flops_per_s(device, measure=measure)
    copies = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return peak * copies, f"{source} x {copies}"
