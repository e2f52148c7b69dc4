"""Where a compiled step's time goes: a jax.profiler trace of a few calls, and its ops ranked by time.

    python -m benchmarks.train_step --profile=/tmp/step_trace

writes the trace (open `perfetto_trace.json.gz` in ui.perfetto.dev, or the directory in TensorBoard's profile
plugin) and prints the ops that took the most time per call. An op is one executed XLA operation: a fusion of
elementwise work, a matmul (on XLA:CPU a `dot` or a library fusion such as `ynn_fusion`), a copy or transpose.
XLA:CPU runs independent ops at the same time, so per-op times can add up to more than the step's wall time; the
printout says for how much of the traced call at least one op was running. Where that is well below the call's
wall time, look for `dot` ops: XLA:CPU hands some (e.g. weight gradients that contract the token axis) to Eigen,
which runs them asynchronously, and the trace shows only their dispatch.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

# Trace events that wrap the ops (the executable, the thunk executor, thread-pool bookkeeping) rather than being
# one: counting them would count every op twice.
_WRAPPER_PREFIXES = ("$", "Thunk", "Pjit", "Slinky", "Threadpool", "ThreadpoolListener", "end:", "Common",
                     "Execute", "ynn::", "PjRt", "TfrtCpu")
# Names of library and XLA ops that multiply matrices on CPU and GPU backends.
_MATMUL_MARKERS = ("dot", "gemm", "ynn_fusion", "xnn_fusion", "onednn", "matmul", "cutlass", "cublas")


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str
    seconds_per_call: float  # summed over the op's executions in one call
    executions_per_call: float
    is_matmul: bool
    description: str = ""  # output shape and the JAX operation it came from, where the HLO text was given


@dataclasses.dataclass(frozen=True)
class OpProfile:
    ops: list[OpTime]  # most time first
    busy_seconds_per_call: float  # wall time during which at least one op was running
    trace_file: Path
    wall_seconds_per_call: float = 0.0  # of the traced calls (tracing slows them down a little)


def profile_ops(run: Callable[[], Any], calls: int, trace_dir: str | Path, hlo_text: str = "") -> OpProfile:
    """Trace `calls` calls of `run` (after one untraced warm-up call) and rank the ops they executed.

    `hlo_text`: the compiled program's HLO (`lowered.compile().as_text()`), to describe each op.
    """
    jax.block_until_ready(run())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(run())
        wall_s = (time.perf_counter() - start) / calls
    traces = sorted(Path(trace_dir).glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(traces[-1]) as trace_file:
        trace = json.loads(trace_file.read())
    profile = rank_ops(trace, calls, traces[-1], op_descriptions(hlo_text))
    return dataclasses.replace(profile, wall_seconds_per_call=wall_s)


def is_op_event(event: dict) -> bool:
    return event.get("ph") == "X" and not str(event.get("name", "")).startswith(_WRAPPER_PREFIXES)


def rank_ops(trace: dict, calls: int, trace_file: Path, descriptions: dict[str, str] | None = None) -> OpProfile:
    """Per-op times of a parsed trace (Chrome/Perfetto JSON: "X" events with microsecond `ts` and `dur`)."""
    events = [e for e in trace.get("traceEvents", []) if is_op_event(e)]
    micros: collections.Counter = collections.Counter()
    executions: collections.Counter = collections.Counter()
    for event in events:
        micros[event["name"]] += event.get("dur", 0)
        executions[event["name"]] += 1
    descriptions = descriptions or {}
    ops = [OpTime(name, us / calls / 1e6, executions[name] / calls, is_matmul(name, descriptions.get(name, "")),
                  descriptions.get(name, "")) for name, us in micros.most_common()]
    return OpProfile(ops, busy_microseconds(events) / calls / 1e6, trace_file)


_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\(.*?'
                          r'metadata=\{op_name="([^"]*)"', re.MULTILINE)


def op_descriptions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> "shape opcode <- JAX operation" from HLO text (`%fusion.3 = f32[8,256] fusion(...),
    ..., metadata={op_name="jit(step)/transpose(jvp())/dot_general" ...}`); `transpose(jvp())` marks the
    backward pass."""
    return {m.group(1): f"{m.group(2)} {m.group(3)} <- {m.group(4)}" for m in _INSTRUCTION.finditer(hlo_text)}


def is_matmul(op_name: str, description: str = "") -> bool:
    """From the HLO where known (a `dot`, or a library fusion made from a dot_general; library fusions of
    reductions exist too), else from the op's name."""
    if description:
        shape_and_opcode, _, jax_operation = description.partition(" <- ")
        return shape_and_opcode.endswith(" dot") or jax_operation.endswith("dot_general")
    return any(marker in op_name.lower() for marker in _MATMUL_MARKERS)


def busy_microseconds(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur) spans: the time at least one op was running."""
    busy, current_start, current_end = 0.0, None, None
    for start, end in sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events):
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy


def matmul_and_other_seconds(profile: OpProfile) -> tuple[float, float]:
    """Seconds per call spent in matmul ops and in all other ops, summed over every op of the trace."""
    matmul_s = sum(op.seconds_per_call for op in profile.ops if op.is_matmul)
    other_s = sum(op.seconds_per_call for op in profile.ops if not op.is_matmul)
    return matmul_s, other_s


def summary_lines(profile: OpProfile, top: int = 15) -> list[str]:
    matmul_s, other_s = matmul_and_other_seconds(profile)
    lines = [f"profile ({profile.trace_file}), per traced call of {1e3 * profile.wall_seconds_per_call:.1f} ms: "
             f"matmul ops {1e3 * matmul_s:.1f} ms, other ops {1e3 * other_s:.1f} ms (concurrent ops overlap); "
             f"some op running for {1e3 * profile.busy_seconds_per_call:.1f} ms"]
    for op in profile.ops[:top]:
        lines.append(f"  {1e3 * op.seconds_per_call:8.2f} ms  x{op.executions_per_call:<4g} "
                     f"{'matmul' if op.is_matmul else 'other ':6s}  {op.name}  {op.description}".rstrip())
    return lines
