"""Ahead-of-time compiles for a target mesh: will this train step fit, and how much does it compute?

A target is a TPU topology such as `v5p:2x4x4` (its devices come from libtpu's topology description, so a CPU-only
machine compiles for a pod it does not have; `pip install -e '.[tpu]'`) or `cpu:N` (N fake host devices). The step
is lowered on abstract inputs (`jax.ShapeDtypeStruct`s with shardings: no parameter is ever created), compiled by
the target's XLA, and read back: per-device argument / output / temporary bytes, the peak they add up to, and the
matmul FLOPs per device (lm_core.hlo_flops, loops counted per iteration).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax

from lm_core.errors import UserError
from lm_core.hlo_flops import collective_bytes, matmul_flops_by_origin, opaque_kernel_calls, recomputed_matmul_flops

# HBM per chip, in bytes, by JAX device_kind (the vendors' figures in GB, so the checks err on the small side).
TPU_MEMORY_BYTES = {"TPU v4": 32e9, "TPU v5 lite": 16e9, "TPU v5": 95e9, "TPU v5p": 95e9, "TPU v6 lite": 32e9}
FIT_FRACTION = 0.9  # a step "fits" when its peak is at most this share of the device's memory
TPU_EXAMPLES = "v5p:2x4x4, v5e:2x2, v5e:4x4, v4:2x2x1, v6e:2x2"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: "v5p:2x4x4" or "cpu:8"
    platform: str  # "tpu" or "cpu"
    devices: tuple[Any, ...]
    device_kind: str
    device_memory_bytes: float


def target_for(name: str) -> Target:
    """The devices of a topology name; UserError (one line) for a bad name, a missing libtpu or too few CPUs."""
    platform, _, shape = name.partition(":")
    if platform == "cpu":
        return _cpu_target(name, shape)
    if not re.fullmatch(r"v\d+[a-z]*", platform) or not re.fullmatch(r"\d+(x\d+)*", shape):
        raise UserError(f"--topology={name!r} is not a topology; valid: cpu:<devices> or a TPU topology such as "
                        f"{TPU_EXAMPLES}")
    try:
        import libtpu  # noqa: F401
    except ImportError as error:
        raise UserError(f"--topology={name} needs libtpu to compile for TPUs; install it with "
                        "pip install -e '.[tpu]'") from error
    from jax.experimental import topologies

    try:
        devices = tuple(topologies.get_topology_desc(name, platform="tpu").devices)
    except Exception as error:  # libtpu's own message, e.g. an unknown chip or shape
        raise UserError(f"--topology={name} is not a TPU topology libtpu knows ({_first_line(error)}); valid "
                        f"e.g. {TPU_EXAMPLES}") from error
    kind = devices[0].device_kind
    memory = TPU_MEMORY_BYTES.get(kind)
    if memory is None:
        raise UserError(f"--topology={name}: no memory size known for device kind {kind!r}; known: "
                        f"{sorted(TPU_MEMORY_BYTES)}")
    return Target(name, "tpu", devices, kind, memory)


def _cpu_target(name: str, count: str) -> Target:
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"--topology={name!r}: cpu takes a device count, e.g. cpu:8")
    wanted = int(count)
    devices = jax.devices("cpu")
    if len(devices) < wanted:
        raise UserError(f"--topology={name} needs {wanted} CPU devices but JAX has {len(devices)}; start with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / wanted  # fake devices share the host's
    return Target(name, "cpu", tuple(devices[:wanted]), devices[0].device_kind, memory)


def prepare_environment(topology: str) -> None:
    """Must run before JAX starts a backend: for `cpu:N`, ask XLA for N host devices; for TPU topologies, let
    libtpu load although another process (a test worker, a second compile) holds its machine-wide lock."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    platform, _, count = topology.partition(":")
    flags = os.environ.get("XLA_FLAGS", "")
    if platform == "cpu" and count.isdigit() and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device figures of one compiled program (the JSON keys of experiments.compile_check)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of (donated) arguments
    temp_bytes: int
    per_device_peak_bytes: int
    compiled_flops_per_device: float  # matmul FLOPs of the compiled program (lm_core.hlo_flops)
    compiled_flops_by_origin: dict[str, float]  # the same by JAX operation: dot_general, gather, scatter-add, ...
    recomputed_flops_per_device: float  # the part of it that remat's recomputation adds
    opaque_kernel_calls: dict[str, float]  # kernels whose FLOPs no count can see (splash, cuDNN), calls per step
    xla_cost_analysis_flops: float  # XLA's own figure, which counts each loop body once
    compile_s: float
    collective_bytes: dict[str, float]  # bytes per device of all-to-all, all-gather, ... (lm_core.hlo_flops)


def compile_lowered(lowered: jax.stages.Lowered) -> CompileReport:
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, Sequence) else costs
    hlo = compiled.as_text()
    by_origin = matmul_flops_by_origin(hlo)
    return CompileReport(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                         memory.temp_size_in_bytes, int(peak), sum(by_origin.values()), by_origin,
                         recomputed_matmul_flops(hlo), opaque_kernel_calls(hlo),
                         float((costs or {}).get("flops", 0.0)), compile_s, collective_bytes(hlo))


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__
