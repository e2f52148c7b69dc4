"""The bench model's training step in PyTorch on CPU (eager and torch.compile) against the JAX train step.

    python -m benchmarks.torch_reference [--json] [--mode=processes|interleaved] [--rounds=3] [--steps=10]
        [--batch=8] [--seq=256] [--threads=auto|1,2] [--no_compile] [--compile_timeout=300] [--settle=1]
        [--torch_only]

The reference is benchmarks/torch_model.py: the `bench` model of benchmarks/train_step.py (4 layers, d=256, 4 heads,
d_ff 688, V=4096, untied, f32, AdamW with clipping) written the way a PyTorch user would, with stock modules (one
fused qkv projection, F.scaled_dot_product_attention, nn.RMSNorm). The JAX step is
benchmarks.train_step.make_bench_step. Both models' parameter counts are printed and must agree. tokens/s is
batch·seq over the median of `--steps` timed steps that follow the first step (compilation for JAX and
torch.compile) and one warm-up step.

--mode=processes (the default) times each framework in its own fresh Python process, one after the other, for
`--rounds` rounds; each round starts one place further along the list (torch eager, torch.compile, JAX), so a
change of the machine's load does not always hit the same framework. Each framework's tokens/s is the median over
the rounds; the ratios (jax / torch eager, jax / torch.compile) are ratios of those medians. This is how each
framework runs in a real training job: alone. Both runtimes keep their own thread pools (XLA's, PyTorch's OpenMP),
and timed in one process they slow each other: right after the other framework's step, a step is 20-35% slower on
the 2-core development machine, and settling steps (below) only partly undo it.

--mode=interleaved keeps the older in-process comparison: torch eager and JAX in this one process, taking turns
step by step (benchmarks.common.interleaved_median_seconds), each timed step after `--settle` untimed steps of its
own kind. It sees the same load on both sides but not each framework's own speed; no torch.compile there.

XLA:CPU uses every core. torch is timed with one thread and with every core (--threads; each count is its own
worker process), because PyTorch's OpenMP kernels on a machine shared with other work can be several times slower
with all cores than with one; each torch baseline is its faster setting. torch.compile (inductor, which needs a C++
compiler) compiles the whole `train_step` function; if it fails or its process takes longer than
`--compile_timeout` seconds in all, its tokens/s is null and the reason is printed. `--no_compile` skips it.

torch is optional (`pip install -e .[torch]`, a CPU-only build is enough); without it this prints one line and
exits 2. Prints ratios, never asserts timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.common import (
    ArgumentParser,
    emit,
    interleaved_median_seconds,
    median_seconds,
    nonnegative_int,
    positive_float,
    positive_int,
)
from benchmarks.train_step import bench_config, make_bench_step
from lm_core import flops
from lm_core.config import ModelConfig
from lm_core.model import Transformer

REPO = Path(__file__).resolve().parents[1]
# a torch eager or JAX worker needs well under a minute at the default sizes; one still running after this hangs
WORKER_TIMEOUT_S = 1800.0
TIMED_KEYS = ("tokens_per_s", "step_s", "first_step_s")


@dataclasses.dataclass(frozen=True)
class Worker:
    """One framework at one torch thread count, timed in a fresh process."""

    framework: str  # "torch_eager", "torch_compile" or "jax"
    threads: int | None = None  # torch intra-op threads; None for JAX (XLA:CPU uses every core)

    @property
    def name(self) -> str:
        return self.framework if self.threads is None else f"{self.framework}:{self.threads}"


def jax_param_count(config: ModelConfig) -> int:
    """Parameters of lm_core's Transformer counted from its (abstract) state, not from a formula."""
    params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def make_torch_step(config: ModelConfig, batch: int, seq: int, threads: int, seed: int = 0, compiled: bool = False
                    ) -> tuple[Callable[[], Any], int]:
    """(one training step of the PyTorch model on `threads` intra-op threads, its parameter count). `compiled`
    wraps the whole step in torch.compile; it compiles on the first call, for the thread count set then."""
    import torch

    from benchmarks import torch_model

    torch.manual_seed(seed)
    model = torch_model.Transformer(config)
    optimizer = torch_model.make_optimizer(model)
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq + 1)))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    params = sum(p.numel() for p in model.parameters())
    train_step = torch.compile(torch_model.train_step) if compiled else torch_model.train_step

    def step() -> Any:
        # torch's thread count is process-wide: set it on every call so differently threaded steps can alternate
        torch.set_num_threads(threads)
        return train_step(model, optimizer, inputs, targets)

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
        print(f"error: --threads={text!r} must be 'auto' or comma-separated positive integers, e.g. 1,2",
              file=sys.stderr)
        sys.exit(2)
    return counts


def parse_arguments() -> Any:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mode", default="processes", choices=["processes", "interleaved"],
                        help="processes: each framework in its own fresh process (default); interleaved: both in "
                             "this process, taking turns")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="processes mode: how many times each framework's process is run (median of them)")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--threads", default="auto",
                        help="torch intra-op thread counts to time, e.g. 1,2 (auto: 1 and all usable cores)")
    parser.add_argument("--no_compile", action="store_true", help="processes mode: skip the torch.compile baseline")
    parser.add_argument("--compile_timeout", type=positive_float, default=300.0,
                        help="processes mode: seconds a torch.compile process may take in all before it counts as "
                             "failed (default 300)")
    parser.add_argument("--settle", type=nonnegative_int, default=1,
                        help="interleaved mode: untimed steps of the same kind right before each timed step "
                             "(0: strict alternation)")
    parser.add_argument("--torch_only", action="store_true", help="time only the PyTorch step")
    # private: what the processes mode launches; one framework, one thread count, one JSON line on stdout
    parser.add_argument("--worker", choices=["torch_eager", "torch_compile", "jax"], help=argparse.SUPPRESS)
    return parser.parse_args()


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        print("benchmarks.torch_reference needs PyTorch, which is not installed: pip install -e .[torch] "
              "(a CPU-only build is enough)", file=sys.stderr)
        sys.exit(2)
    return torch


def run_worker(args: Any) -> None:
    """--worker: build one framework's step in this fresh process, time it, print one JSON line."""
    if args.worker == "jax":
        bench = make_bench_step(args.batch, args.seq)
        run, first_step_s, params = bench.run, bench.compile_s, jax_param_count(bench.config)
    else:
        (threads,) = thread_counts(args.threads)
        run, params = make_torch_step(bench_config(), args.batch, args.seq, threads,
                                      compiled=args.worker == "torch_compile")
        start = time.perf_counter()
        run()
        first_step_s = time.perf_counter() - start
    step_s = median_seconds(run, repeats=args.steps)  # after one more, untimed warm-up step
    print(json.dumps({"tokens_per_s": args.batch * args.seq / step_s, "step_s": step_s,
                      "first_step_s": first_step_s, "params": params}), flush=True)


def worker_plan(args: Any, threads: list[int]) -> list[Worker]:
    plan = [Worker("torch_eager", count) for count in threads]
    if not args.no_compile:
        plan += [Worker("torch_compile", count) for count in threads]
    if not args.torch_only:
        plan.append(Worker("jax"))
    return plan


def round_order(plan: list[Worker], round_index: int) -> list[Worker]:
    """Round r starts r places further along the plan, so no framework is always first or always last."""
    shift = round_index % len(plan)
    return plan[shift:] + plan[:shift]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def launch_worker(worker: Worker, args: Any, timeout_s: float) -> dict[str, float] | str:
    """Runs one worker process; its report, or why there is none."""
    command = [sys.executable, "-m", "benchmarks.torch_reference", f"--worker={worker.framework}",
               f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}"]
    if worker.threads is not None:
        command.append(f"--threads={worker.threads}")
    # its own session, so a timeout also ends the compiler processes torch.compile may have started
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except BaseException as error:  # the timeout, or Ctrl-C: either way the worker must not outlive us
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            if isinstance(error, subprocess.TimeoutExpired):
                return f"its process took longer than {timeout_s:g} s"
            raise
    if process.returncode != 0:
        return f"its process exited with {process.returncode}: {last_line(stderr)}"
    try:
        return json.loads(last_line(stdout))
    except json.JSONDecodeError:
        return f"its process printed no result: {last_line(stdout)}"


def run_rounds(plan: list[Worker], args: Any) -> tuple[dict[str, list[dict[str, float]]], dict[str, str]]:
    """({worker name: its reports, one per round}, {worker name: why it stopped}). torch.compile may fail (no
    compiler, an inductor error, the timeout): it is then not run again. Any other worker failing is fatal."""
    reports: dict[str, list[dict[str, float]]] = {worker.name: [] for worker in plan}
    failures: dict[str, str] = {}
    for round_index in range(args.rounds):
        for worker in round_order(plan, round_index):
            if worker.name in failures:
                continue
            compiled = worker.framework == "torch_compile"
            outcome = launch_worker(worker, args, args.compile_timeout if compiled else WORKER_TIMEOUT_S)
            if isinstance(outcome, dict):
                reports[worker.name].append(outcome)
            elif compiled:
                failures[worker.name] = outcome
            else:
                print(f"error: benchmarks.torch_reference's {worker.name} worker failed: {outcome}",
                      file=sys.stderr)
                sys.exit(1)
    return reports, failures


def median_report(reports: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(report[key] for report in reports) for key in TIMED_KEYS}


def torch_baseline(framework: str, threads: list[int], reports: dict[str, list[dict[str, float]]]
                   ) -> dict[str, Any] | None:
    """The framework's medians at its fastest thread count, with tokens/s by thread count; None without results."""
    medians = {count: median_report(reports[f"{framework}:{count}"]) for count in threads
               if reports.get(f"{framework}:{count}")}
    if not medians:
        return None
    best = max(medians, key=lambda count: medians[count]["tokens_per_s"])
    return {**medians[best], "threads": best,
            "by_threads": {str(count): median["tokens_per_s"] for count, median in medians.items()}}


def processes_result(args: Any, threads: list[int], reports: dict[str, list[dict[str, float]]],
                     failures: dict[str, str]) -> dict[str, Any]:
    """The JSON report of --mode=processes (the keys of --mode=interleaved, plus torch.compile's and the rounds')."""
    eager = torch_baseline("torch_eager", threads, reports)
    assert eager is not None  # a failed eager worker already ended the run
    compiled = torch_baseline("torch_compile", threads, reports)
    result: dict[str, Any] = {
        "mode": "processes", "rounds": args.rounds,
        "tokens_per_s": eager["tokens_per_s"], "step_s": eager["step_s"], "threads": eager["threads"],
        "tokens_per_s_by_threads": eager["by_threads"], "first_step_s": eager["first_step_s"],
        "torch_params": int(reports[f"torch_eager:{eager['threads']}"][0]["params"]),
        "torch_compile_tokens_per_s": compiled and compiled["tokens_per_s"],
        "torch_compile_step_s": compiled and compiled["step_s"],
        "torch_compile_threads": compiled and compiled["threads"],
        "torch_compile_tokens_per_s_by_threads": compiled and compiled["by_threads"],
        "torch_compile_first_step_s": compiled and compiled["first_step_s"],
        "torch_compile_error": compile_error(args, compiled, failures),
        "rounds_tokens_per_s": {name: [r["tokens_per_s"] for r in runs] for name, runs in reports.items()},
        "rounds_first_step_s": {name: [r["first_step_s"] for r in runs] for name, runs in reports.items()},
    }
    if reports.get("jax"):
        jax_median = median_report(reports["jax"])
        result.update(jax_tokens_per_s=jax_median["tokens_per_s"], jax_step_s=jax_median["step_s"],
                      jax_compile_s=jax_median["first_step_s"],
                      jax_over_torch=jax_median["tokens_per_s"] / eager["tokens_per_s"],
                      jax_over_torch_compile=compiled and jax_median["tokens_per_s"] / compiled["tokens_per_s"])
    return result


def compile_error(args: Any, compiled: dict[str, Any] | None, failures: dict[str, str]) -> str | None:
    """Why there is no torch.compile number, or why some of its processes gave none, in one line; else None."""
    if failures:
        return "; ".join(f"{name} failed: {reason}" for name, reason in failures.items())
    return "skipped (--no_compile)" if compiled is None else None


def processes_lines(result: dict[str, Any], threads: list[int]) -> list[str]:
    """The human-readable report of --mode=processes."""
    rounds, first = result["rounds_tokens_per_s"], result["rounds_first_step_s"]

    def line(label: str, name: str, tokens_per_s: float, note: str) -> str:
        per_round = ", ".join(f"{value:,.0f}" for value in rounds[name])
        return f"{label:<24} {tokens_per_s:8,.0f} tokens/s (rounds: {per_round}){note}"

    lines = []
    for framework, label in (("torch_eager", "torch eager"), ("torch_compile", "torch.compile")):
        prefix = "" if framework == "torch_eager" else "torch_compile_"
        for count in threads:
            name = f"{framework}:{count}"
            if not rounds.get(name):
                continue
            best = count == result[f"{prefix}threads"]
            note = ", the baseline" if best else ""
            if framework == "torch_compile":
                note += "; first step incl. compile " + ", ".join(f"{s:.1f}" for s in first[name]) + " s"
            value = result[f"{prefix}tokens_per_s_by_threads"][str(count)]
            lines.append(line(f"{label}, {count} thread{'s' if count > 1 else ''}", name, value, note))
    if result["torch_compile_error"]:
        none = "none; " if result["torch_compile_tokens_per_s"] is None else ""
        lines.append(f"torch.compile: {none}{result['torch_compile_error']}")
    if "jax_tokens_per_s" in result:
        compile_s = ", ".join(f"{s:.1f}" for s in first["jax"])
        lines.append(line("jax", "jax", result["jax_tokens_per_s"], f"; compile {compile_s} s"))
        versus_compile = result["jax_over_torch_compile"]
        lines.append(f"jax / torch eager tokens/s: {result['jax_over_torch']:.2f}x; jax / torch.compile: "
                     + (f"{versus_compile:.2f}x" if versus_compile is not None else "-"))
    return lines


def run_processes(args: Any, threads: list[int], config: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    reports, failures = run_rounds(worker_plan(args, threads), args)
    result = processes_result(args, threads, reports, failures)
    header = (f"each framework in its own fresh process, {args.rounds} round{'s' if args.rounds > 1 else ''} in "
              f"rotating order; tokens/s: median over rounds of each process's median of {args.steps} steps")
    return result, [header, *processes_lines(result, threads)]


def run_interleaved(args: Any, threads: list[int], config: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    """--mode=interleaved: torch eager at each thread count and JAX in this process, taking turns."""
    runs: dict[str, Callable[[], Any]] = {}
    first_s: dict[int, float] = {}
    for count in threads:
        step, torch_params = make_torch_step(config, args.batch, args.seq, count)
        start = time.perf_counter()
        step()
        first_s[count] = time.perf_counter() - start
        runs[f"torch_eager:{count}"] = step
    if not args.torch_only:
        bench = make_bench_step(args.batch, args.seq)
        runs["jax"] = bench.run
    seconds = interleaved_median_seconds(runs, repeats=args.steps, settle=args.settle)

    tokens = args.batch * args.seq
    by_threads = {count: tokens / seconds[f"torch_eager:{count}"] for count in threads}
    best = max(by_threads, key=by_threads.__getitem__)
    result: dict[str, Any] = {
        "mode": "interleaved", "rounds": 1, "tokens_per_s": by_threads[best],
        "step_s": seconds[f"torch_eager:{best}"], "threads": best,
        "tokens_per_s_by_threads": {str(count): value for count, value in by_threads.items()},
        "first_step_s": first_s[best], "torch_params": torch_params,
        **dict.fromkeys(["torch_compile_tokens_per_s", "torch_compile_step_s", "torch_compile_threads",
                         "torch_compile_tokens_per_s_by_threads", "torch_compile_first_step_s"]),
        "torch_compile_error": "not timed in --mode=interleaved",
        "rounds_tokens_per_s": {name: [tokens / value] for name, value in seconds.items()},
    }
    lines = [f"all runs interleaved in this process, median of {args.steps} steps each"]
    lines += [f"torch eager step {seconds[f'torch_eager:{count}'] * 1e3:7.1f} ms, {by_threads[count]:8,.0f} tokens/s "
              f"({count} thread{'s' if count > 1 else ''}{', the baseline' if count == best else ''})"
              for count in threads]
    if "jax" in seconds:
        result.update(jax_tokens_per_s=tokens / seconds["jax"], jax_step_s=seconds["jax"],
                      jax_compile_s=bench.compile_s, jax_over_torch=seconds[f"torch_eager:{best}"] / seconds["jax"],
                      jax_over_torch_compile=None)
        lines += [f"jax         step {seconds['jax'] * 1e3:7.1f} ms, {result['jax_tokens_per_s']:8,.0f} tokens/s "
                  f"(compile {bench.compile_s:.1f} s)",
                  f"jax / torch eager tokens/s: {result['jax_over_torch']:.2f}x (against torch's faster thread count)"]
    return result, lines


def main() -> None:
    args = parse_arguments()
    threads = thread_counts(args.threads)
    if args.worker:
        if args.worker != "jax":  # the JAX worker leaves torch unimported, as a JAX training job would
            require_torch()
        run_worker(args)
        return
    torch = require_torch()
    config = bench_config()
    run = run_processes if args.mode == "processes" else run_interleaved
    result, lines = run(args, threads, config)
    jax_params = jax_param_count(config)
    result.update(jax_params=jax_params, formula_params=flops.param_counts(config).total,
                  torch_version=torch.__version__, batch=args.batch, seq=args.seq, steps=args.steps,
                  d_ff=config.d_ff)
    torch_params = result["torch_params"]
    header = [f"bench model: 4 layers, d=256, d_ff={config.d_ff}, V=4096, seq {args.seq}, batch {args.batch}, "
              f"float32; torch {torch.__version__} vs JAX {jax.__version__}",
              f"parameters: torch {torch_params:,}, jax {jax_params:,}"
              + ("" if torch_params == jax_params else "   MISMATCH: the two models differ")]
    emit(result, args.json, header + lines)


if __name__ == "__main__":
    main()
