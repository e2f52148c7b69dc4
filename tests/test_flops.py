"""Parameter and FLOP counts against hand arithmetic and against the real model; MFU and peak-FLOPs plumbing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from lm_core import flops
from lm_core.config import ModelConfig


def tiny(**changes) -> ModelConfig:
    """V=10, d=8, 2 layers, 2 query heads sharing 1 KV head of dim 4, d_ff=16."""
    base = dict(vocab_size=10, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=16,
                tie_embeddings=False)
    base.update(changes)
    return ModelConfig(**base)


def test_param_counts_untied_by_hand():
    counts = flops.param_counts(tiny())
    # per layer: q 8*2*4=64, k 8*1*4=32, v 32, out 2*4*8=64 -> 192; two layers -> 384
    assert counts.attention == 384
    # per layer: gate 8*16 + up 8*16 + down 16*8 = 384; two layers -> 768
    assert counts.ffn == 768
    # two norms of 8 per layer (32) + final norm 8
    assert counts.norms == 40
    assert counts.non_vocab == 384 + 768 + 40 == 1192
    assert counts.embedding == counts.output == counts.vocab == 80
    assert counts.total == 1192 + 80 + 80 == 1352


def test_param_counts_tied_counts_the_table_once():
    counts = flops.param_counts(tiny(tie_embeddings=True))
    assert counts.output == 0
    assert counts.vocab == 80
    assert counts.total == 1192 + 80 == 1272


def test_qk_norm_adds_two_head_dim_scales_per_layer():
    counts = flops.param_counts(tiny(qk_norm=True))
    assert counts.norms == 40 + 2 * 2 * 4 == 56
    assert counts.non_vocab == 1208


def test_gqa_shrinks_only_key_and_value_projections():
    mha = flops.param_counts(tiny(num_kv_heads=2))
    # per layer: q 64, k 64, v 64, out 64 -> 256; two layers -> 512 (vs 384 with one KV head)
    assert mha.attention == 512
    assert mha.ffn == 768
    assert flops.flops_per_token(tiny(num_kv_heads=2), 6).attention_projections == 2 * 512


def test_flops_per_token_by_hand():
    per_token = flops.flops_per_token(tiny(), seq_len=6)  # causal
    assert per_token.attention_projections == 2 * 384 == 768
    # 2 layers * 2 (QK^T and AV) * 2 FLOPs * 2 heads * 4 dims * (6 + 1) / 2 attended keys
    assert per_token.attention_scores == 2 * 2 * 2 * 2 * 4 * 3.5 == 224
    assert per_token.ffn == 2 * 768 == 1536
    assert per_token.output_layer == 2 * 8 * 10 == 160
    assert per_token.forward == 768 + 224 + 1536 + 160 == 2688
    assert per_token.training == 3 * 2688 == 8064


def test_full_attention_attends_to_every_key():
    per_token = flops.flops_per_token(tiny(), seq_len=6, causal=False)
    assert per_token.attention_scores == 2 * 2 * 2 * 2 * 4 * 6 == 384
    assert per_token.forward == 768 + 384 + 1536 + 160 == 2848


def test_causal_average_is_half_of_seq_plus_one():
    assert flops.attended_keys(1) == 1.0
    assert flops.attended_keys(4) == 2.5  # tokens see 1, 2, 3, 4 keys
    assert flops.attended_keys(4, causal=False) == 4.0


def test_tied_embeddings_do_not_change_flops():
    assert flops.flops_per_token(tiny(tie_embeddings=True), 6) == flops.flops_per_token(tiny(), 6)


def test_training_flops_scale_with_tokens():
    assert flops.training_flops(tiny(), 6, tokens=1000) == 8064 * 1000
    assert flops.training_flops(tiny(), 6, tokens=1000, causal=False) == 3 * 2848 * 1000


def test_rejects_empty_rows():
    with pytest.raises(ValueError, match="seq_len=0"):
        flops.flops_per_token(tiny(), 0)


def test_mfu_arithmetic():
    # 1000 tok/s * 6e9 FLOP/tok = 6e12 FLOP/s achieved, over a 1e13 FLOP/s peak
    assert flops.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="peak_flops_per_s"):
        flops.mfu(1000.0, 6e9, 0.0)


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("Tesla V100-PCIE-32GB", 112e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),  # must not fall back to "l4"
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # must not fall back to "tpu v5" (v5p)
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
])
def test_table_picks_the_most_specific_entry(kind, expected):
    _, peak = flops.table_peak_flops(kind)
    assert peak == expected


def test_table_has_no_entry_for_unknown_kinds():
    assert flops.table_peak_flops("Imaginary Accelerator 9000") is None
    assert flops.table_peak_flops("cpu") is None


def test_peak_of_a_known_accelerator_comes_from_the_table():
    device = SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-40GB")
    assert flops.peak_flops_per_s(device) == (312e12, "table:NVIDIA A100-SXM4-40GB")


def test_peak_without_measuring_is_nan_for_unknown_devices():
    device = SimpleNamespace(platform="gpu", device_kind="Imaginary Accelerator 9000")
    peak, source = flops.peak_flops_per_s(device, measure=False)
    assert math.isnan(peak) and "not measured" in source
    peak, _ = flops.peak_flops_per_s(jax.devices()[0], measure=False)
    assert math.isnan(peak)


def test_measured_matmul_rate_is_positive_and_finite():
    rate = flops.measure_matmul_flops_per_s(size=128, dtype=jnp.float32, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_cpu_peak_is_measured_once_per_process():
    peak, source = flops.peak_flops_per_s()
    assert math.isfinite(peak) and peak > 0
    assert source == "measured matmul (cpu, float32)"
    assert flops.peak_flops_per_s()[0] == peak  # cached, not re-timed
    total, total_source = flops.total_peak_flops_per_s()
    assert total == peak * jax.process_count()  # fake CPU devices share the host's cores
    assert total_source.startswith(source)


MODEL_CONFIGS = {
    "untied_gqa": tiny(),
    "tied": tiny(tie_embeddings=True),
    "qk_norm_mha": tiny(num_kv_heads=2, qk_norm=True),
    "swin": tiny(norm_placement="swin"),
    "defaults": ModelConfig(),
}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_param_counts_match_the_model(name):
    model_lib = pytest.importorskip("lm_core.model")
    from flax import nnx

    config = MODEL_CONFIGS[name]
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    real = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert flops.param_counts(config).total == real


def test_flops_match_xla_cost_analysis_of_the_forward():
    """XLA counts the FLOPs of the compiled forward; the model computes full (masked) attention, so causal=False.

    XLA also counts norms, softmax, RoPE and SiLU, which we ignore: it must be a little above, never below.
    """
    model_lib = pytest.importorskip("lm_core.model")
    from flax import nnx

    config = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=384,
                         max_seq_len=64, tie_embeddings=False)
    graphdef, state = nnx.split(model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, 64), jnp.int32)  # [batch, seq]

    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    cost = jax.jit(logits).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if not cost or "flops" not in cost:
        pytest.skip("this backend reports no cost analysis")
    xla_per_token = cost["flops"] / tokens.size
    analytic = flops.flops_per_token(config, 64, causal=False).forward
    assert analytic <= xla_per_token <= 1.05 * analytic
