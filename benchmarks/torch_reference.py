"""The bench model's training step in plain PyTorch eager on CPU against the JAX train step, side by side.

    python -m benchmarks.torch_reference [--json] [--steps=10] [--batch=8] [--seq=256] [--threads=1,2] [--settle=1]
        [--torch_only]

The reference is benchmarks/torch_model.py: the `bench` model of benchmarks/train_step.py (4 layers, d=256, 4 heads,
d_ff 688, V=4096, untied, f32, AdamW with clipping) written the way a PyTorch user would, with stock modules. Both
steps are timed in this one process and take turns (benchmarks.common.interleaved_median_seconds), so a loaded
machine slows both alike. Each timed step follows `--settle` untimed steps of its own kind: right after the other
framework's step its spinning threads and cached data slow a step by 20-35% on the 2-core development machine, an
effect no training loop has. tokens/s is batch·seq over the median timed step after one warm-up step. The JAX step
is benchmarks.train_step.make_bench_step, compiled before timing. XLA:CPU uses every core; torch is timed with one
thread and with every core (--threads), because PyTorch's OpenMP kernels on a machine shared with other work can be
several times slower with all cores than with one, and the baseline is its faster setting. Both models' parameter
counts are printed and must agree.

torch is optional (`pip install -e .[torch]`, a CPU-only build is enough); without it this prints one line and
exits 2. Prints ratios, never asserts timings.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.common import ArgumentParser, emit, interleaved_median_seconds, nonnegative_int, positive_int
from benchmarks.train_step import bench_config, make_bench_step
from lm_core import flops
from lm_core.config import ModelConfig
from lm_core.model import Transformer


def jax_param_count(config: ModelConfig) -> int:
    """Parameters of lm_core's Transformer counted from its (abstract) state, not from a formula."""
    params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def make_torch_step(config: ModelConfig, batch: int, seq: int, threads: int, seed: int = 0
                    ) -> tuple[Callable[[], Any], int]:
    """(one training step of the PyTorch model on `threads` intra-op threads, its parameter count)."""
    import torch

    from benchmarks import torch_model

    torch.manual_seed(seed)
    model = torch_model.Transformer(config)
    optimizer = torch_model.make_optimizer(model)
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq + 1)))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    params = sum(p.numel() for p in model.parameters())

    def step() -> Any:
        # torch's thread count is process-wide: set it on every call so differently threaded steps can alternate
        torch.set_num_threads(threads)
        return torch_model.train_step(model, optimizer, inputs, targets)

    return step, params


def thread_counts(text: str) -> list[int]:
    """"1,2" -> [1, 2]; "auto" -> 1 and the cores this process may use (OpenMP on a loaded machine can be far
    slower with every core than with one, so the baseline is the better of the two)."""
    if text == "auto":
        return sorted({1, len(os.sched_getaffinity(0))})
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        print(f"--threads={text!r} must be 'auto' or comma-separated positive integers, e.g. 1,2", file=sys.stderr)
        sys.exit(2)
    return counts


def parse_arguments() -> Any:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--threads", default="auto",
                        help="torch intra-op thread counts to time, e.g. 1,2 (auto: 1 and all usable cores)")
    parser.add_argument("--settle", type=nonnegative_int, default=1,
                        help="untimed steps of the same kind right before each timed step (0: strict alternation)")
    parser.add_argument("--torch_only", action="store_true", help="time only the PyTorch step")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    threads = thread_counts(args.threads)
    try:
        import torch
    except ImportError:
        print("benchmarks.torch_reference needs PyTorch, which is not installed: pip install -e .[torch] "
              "(a CPU-only build is enough)", file=sys.stderr)
        sys.exit(2)

    config = bench_config()
    runs: dict[str, Callable[[], Any]] = {}
    first_s: dict[int, float] = {}
    for count in threads:
        step, torch_params = make_torch_step(config, args.batch, args.seq, count)
        start = time.perf_counter()
        step()
        first_s[count] = time.perf_counter() - start
        runs[f"torch{count}"] = step
    jax_params = jax_param_count(config)
    if not args.torch_only:
        bench = make_bench_step(args.batch, args.seq)
        runs["jax"] = bench.run
    seconds = interleaved_median_seconds(runs, repeats=args.steps, settle=args.settle)

    tokens = args.batch * args.seq
    by_threads = {count: tokens / seconds[f"torch{count}"] for count in threads}
    best = max(by_threads, key=by_threads.__getitem__)
    result: dict[str, Any] = {
        "tokens_per_s": by_threads[best], "step_s": seconds[f"torch{best}"], "threads": best,
        "tokens_per_s_by_threads": {str(count): value for count, value in by_threads.items()},
        "first_step_s": first_s[best], "torch_params": torch_params, "jax_params": jax_params,
        "formula_params": flops.param_counts(config).total, "torch_version": torch.__version__,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "d_ff": config.d_ff,
    }
    lines = [
        f"bench model: 4 layers, d=256, d_ff={config.d_ff}, V=4096, seq {args.seq}, batch {args.batch}, float32; "
        f"torch {torch.__version__} eager; median of {args.steps} steps, all runs interleaved",
        f"parameters: torch {torch_params:,}, jax {jax_params:,}"
        + ("" if torch_params == jax_params else "   MISMATCH: the two models differ"),
    ]
    lines += [f"torch step {seconds[f'torch{count}'] * 1e3:7.1f} ms, {by_threads[count]:8,.0f} tokens/s "
              f"({count} thread{'s' if count > 1 else ''}{', the baseline' if count == best else ''})"
              for count in threads]
    if "jax" in seconds:
        result.update(jax_tokens_per_s=tokens / seconds["jax"], jax_step_s=seconds["jax"],
                      jax_compile_s=bench.compile_s, jax_over_torch=seconds[f"torch{best}"] / seconds["jax"])
        lines += [f"jax   step {seconds['jax'] * 1e3:7.1f} ms, {result['jax_tokens_per_s']:8,.0f} tokens/s "
                  f"(compile {bench.compile_s:.1f} s)",
                  f"jax / torch tokens/s: {result['jax_over_torch']:.2f}x (against torch's faster thread count)"]
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
