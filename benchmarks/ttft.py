"""KV prediction's time to first token: measured TTFT reduction vs the FLOPs reduction it promises.

    python -m benchmarks.ttft [--json] [--prompt_lens=256,1024] [--variants=lp0.25,c256x2,c384x4] [--repeats=10]

For a base model and each auxiliary spec, the three compiled first-token functions of
`experiments.kv_prediction.evaluation.measure_ttft` (base only; aux only; KVP = aux on prompt[:-1] -> predicted
base cache -> base on the last token) are timed in turn (warmed up, median of repeats, random weights: timing
does not depend on them). Printed: the FLOPs reduction (base / KVP TTFT FLOPs), the measured reduction (base TTFT /
KVP TTFT) and their ratio; the target is >= 0.9 for prompts of 256+ tokens (the paper's CPU measurements reached
0.65-0.75).

A FLOPs count does not see that KVP's one base token must still read every base weight once: at batch 1 that
is a fixed cost of (base weight bytes / memory bandwidth), measured here with benchmarks.decode's copy bandwidth.
Each line also prints the ratio predicted when everything else runs exactly at the FLOPs reduction and that one
read is added, 1 / (1 + weight_read_s x flops_reduction / base_ttft_s) (`flops_and_weight_read_prediction`):
where it is below 0.9 (a small auxiliary, a short prompt, batch 1) the target is out of reach on this machine
whatever the code does, since batch-1 matrix-vector products do not even reach the copy bandwidth
(benchmarks/decode.py). A second prediction replaces that one read by what the base's part of the path measurably
takes alone (`null_cache_ttft_s`: the cache build and the one-token step on a cache of zeros):
`flops_and_base_token_prediction`; measured at or above it, the rest of the path (auxiliary and predictor) runs at
the base prefill's FLOP rate.

The default auxiliaries: lp0.25 (the base's first 2 of 8 layers), c256x2 (11.9x fewer TTFT FLOPs at 512 tokens)
and c384x4 (3.4x fewer: the paper's regime, a canonical model about a third of the base's prefill FLOPs).

The base is a mid-sized model (8 layers, d=512, V=4096, f32), big enough that a 256-token prefill is compute:
at the tiny reproduction's sizes (d=64-128) the KVP path's few milliseconds are dominated by per-call and per-op
overhead that no FLOPs count sees (`python -m experiments.kv_prediction.ttft` measures those sizes).
"""

from __future__ import annotations

from benchmarks.common import ArgumentParser, emit, positive_int, positive_int_list
from benchmarks.decode import measure_copy_bandwidth
from experiments.kv_prediction.evaluation import measure_ttft
from experiments.kv_prediction.models import Family
from kv_prediction.variants import build_kvp_model, resolve_spec
from lm_core.config import ModelConfig
from lm_core.flops import param_counts

TARGET = 0.9


def ttft_base_config(max_seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=4096, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=1536,
                       max_seq_len=max_seq_len, qk_norm=True)


def family(base: ModelConfig, spec: str) -> Family:
    aux = resolve_spec(base, spec)
    model = build_kvp_model(base, aux, seed=0)
    return Family(aux, model.base, model.aux, model)


def base_token_prediction(row: dict) -> float:
    """measured/FLOPs ratio predicted when the auxiliary and predictor run at the base prefill's FLOP rate and the
    base's part (cache build + one-token step) takes what it measurably takes alone (`null_cache_ttft_s`: the same
    work on a cache of zeros). At batch 1 that step is a chain of matrix-vector products, each bound by what one
    core reads per second, which is well below the copy bandwidth both cores reach."""
    aux_part_s = row["base_ttft_s"] * (row["kvp_flops"] - row["null_cache_flops"]) / row["base_flops"]
    return row["base_ttft_s"] / (aux_part_s + row["null_cache_ttft_s"]) / row["flops_reduction"]


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prompt_lens", type=positive_int_list, default=[256, 1024],
                        help="Comma-separated prompt lengths in tokens.")
    parser.add_argument("--variants", default="lp0.25,c256x2,c384x4",
                        help="Comma-separated auxiliary specs.")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=10)
    args = parser.parse_args()
    prompt_lens = args.prompt_lens
    base = ttft_base_config(max(prompt_lens) + 64)
    results = []
    weight_bytes = param_counts(base).total * 4
    bandwidth = measure_copy_bandwidth(weight_bytes)
    weight_read_s = weight_bytes / bandwidth
    lines = [f"base: {base.num_layers} layers, d_model={base.d_model}; batch {args.batch}; target: measured "
             f"reduction >= {TARGET} x FLOPs reduction at 256+ tokens",
             f"base weights {weight_bytes / 2**20:.0f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s: reading them "
             f"once for KVP's last token takes >= {1e3 * weight_read_s:.1f} ms"]
    for spec in args.variants.split(","):
        models = family(base, spec)
        for prompt_len in prompt_lens:
            r = measure_ttft(models, prompt_len, args.batch, args.repeats, time_null_cache=True)
            r["flops_and_weight_read_prediction"] = 1 / (1 + weight_read_s * r["flops_reduction"] / r["base_ttft_s"])
            r["flops_and_base_token_prediction"] = base_token_prediction(r)
            results.append(r)
            lines.append(f"{spec:>8} prompt {prompt_len:>5}: base {1e3 * r['base_ttft_s']:7.1f} ms, KVP "
                         f"{1e3 * r['kvp_ttft_s']:6.1f} ms, aux alone {1e3 * r['aux_ttft_s']:6.1f} ms | FLOPs "
                         f"reduction {r['flops_reduction']:.2f}x, measured {r['measured_reduction']:.2f}x -> "
                         f"{r['measured_over_flops']:.2f} of the FLOPs reduction (FLOPs + one weight read "
                         f"predict {r['flops_and_weight_read_prediction']:.2f}; FLOPs + the measured base token "
                         f"step {1e3 * r['null_cache_ttft_s']:.1f} ms predict "
                         f"{r['flops_and_base_token_prediction']:.2f})")
    long_prompts = [r["measured_over_flops"] for r in results if r["prompt_len"] >= 256]
    worst = min(long_prompts) if long_prompts else float("nan")  # the target only speaks of 256+ tokens
    lines.append(f"worst measured/FLOPs ratio at 256+ tokens: {worst:.2f} (target >= {TARGET})")
    emit({"results": results, "worst_measured_over_flops": worst, "target": TARGET,
          "copy_bandwidth_bytes_per_s": bandwidth, "base_weight_bytes": weight_bytes}, args.json, lines)


if __name__ == "__main__":
    main()
