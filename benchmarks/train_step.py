"""Training-step throughput and MFU of the `bench` model, against this machine's matmul FLOP/s.

    python -m benchmarks.train_step [--json] [--steps=10] [--dtype=float32|bfloat16] [--remat] [--profile=DIR]

The bench model: 4 layers, d_model=256, 4 heads, seq 256, batch 8, vocabulary 4096, f32 (SwiGLU d_ff from the
8/3 rule). MFU = model FLOPs per second (lm_core.flops, 6N-style analytic count incl. attention) divided by the
matmul FLOP/s measured in this same process (CPU) or the device's published peak (GPU/TPU). Prints ratios, never
asserts timings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import op_profile
from benchmarks.common import ArgumentParser, emit, median_seconds, peak_memory_bytes, positive_int
from lm_core import flops, loss, optim
from lm_core import train_step as ts
from lm_core.config import ModelConfig
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, make_mesh


def bench_config(dtype: str = "float32", remat: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, max_seq_len=256,
                       tie_embeddings=False, dtype=dtype, remat=remat)


@dataclasses.dataclass
class BenchStep:
    """A compiled, already-run training step of the bench model, ready to be timed (by us or side by side with
    another framework's step, as benchmarks/torch_reference.py does)."""

    config: ModelConfig
    batch: int
    seq: int
    compile_s: float  # the first call: tracing, compilation and one step
    run: Callable[[], Any]  # one more optimizer step; returns the step's metrics (block on them to time it)
    hlo_text: Callable[[], str]  # the compiled step's HLO

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


def make_bench_step(batch: int = 8, seq: int = 256, dtype: str = "float32", remat: bool = False) -> BenchStep:
    """Builds the bench model's AdamW train step (lm_core.train_step on one device) and runs it once to compile."""
    config = bench_config(dtype, remat)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0))
    graphdef, state, shardings = ts.init_train_state(lambda: Transformer(config, rngs=nnx.Rngs(0)), optimizer,
                                                     mesh, seed=0)
    step = ts.make_train_step(graphdef, loss.next_token_loss, optimizer, mesh, shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}

    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    holder = {"state": state}  # the step donates its state, so each call must get the previous call's output

    def one_step() -> Any:
        holder["state"], out = step(holder["state"], data)
        return out

    def hlo_text() -> str:
        return step.lower(holder["state"], data).compile().as_text()

    return BenchStep(config, batch, seq, compile_s, one_step, hlo_text)


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--profile", metavar="DIR", default="",
                        help="also trace 3 steps into DIR (jax.profiler; open it in Perfetto or TensorBoard) and "
                             "print the ops that took the most time")
    args = parser.parse_args()

    bench = make_bench_step(args.batch, args.seq, args.dtype, args.remat)
    config, compile_s = bench.config, bench.compile_s
    step_s = median_seconds(bench.run, repeats=args.steps)
    tokens_per_s = args.batch * args.seq / step_s
    flops_per_token = flops.flops_per_token(config, args.seq).training
    peak, peak_source = flops.peak_flops_per_s()
    matmul = flops.measure_matmul_flops_per_s() if jax.default_backend() == "cpu" else peak
    result = {
        "tokens_per_s": tokens_per_s, "step_s": step_s, "mfu": flops.mfu(tokens_per_s, flops_per_token, peak),
        "model_flops_per_s": tokens_per_s * flops_per_token, "matmul_flops_per_s": matmul,
        "peak_flops_per_s": peak, "peak_source": peak_source, "compile_s": compile_s,
        "peak_memory_bytes": peak_memory_bytes(), "d_ff": config.d_ff, "dtype": args.dtype,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "params": flops.param_counts(config).total, "flops_per_token": flops_per_token,
    }
    profile_lines: list[str] = []
    if args.profile:
        profile = op_profile.profile_ops(bench.run, calls=3, trace_dir=args.profile, hlo_text=bench.hlo_text())
        matmul_s, other_s = op_profile.matmul_and_other_seconds(profile)
        matmuls = [op for op in profile.ops if op.is_matmul]
        result["profile"] = {"trace_file": str(profile.trace_file), "busy_s": profile.busy_seconds_per_call,
                             "wall_s": profile.wall_seconds_per_call, "matmul_s": matmul_s, "other_s": other_s,
                             "top_ops": [dataclasses.asdict(op) for op in profile.ops[:15]],
                             "top_matmul": dataclasses.asdict(matmuls[0]) if matmuls else None,
                             # matmuls the compiled HLO names (library fusions the runtime names have no HLO line)
                             "described_matmuls": sum("dot" in op.description for op in matmuls)}
        profile_lines = op_profile.summary_lines(profile)
    emit(result, args.json, [
        f"bench model: 4 layers, d=256, d_ff={config.d_ff}, V=4096, seq {args.seq}, batch {args.batch}, {args.dtype}",
        f"step {step_s * 1e3:.1f} ms (median of {args.steps}), {tokens_per_s:,.0f} tokens/s, compile {compile_s:.1f} s",
        f"model FLOP/s {result['model_flops_per_s'] / 1e9:.1f} G vs peak {peak / 1e9:.1f} G ({peak_source})",
        f"MFU {100 * result['mfu']:.1f}%   (target >= 55%)",
        f"peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB",
        *profile_lines,
    ])


if __name__ == "__main__":
    main()
