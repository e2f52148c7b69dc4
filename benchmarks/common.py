"""Timing helpers shared by the benchmarks: compile once, warm up, report the median of repeats."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's bad-input contract: one `error:` line naming the bad value, exit code 2 (plain
    argparse prints its whole usage first)."""

    def __init__(self, description: str | None):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (sizes, steps, repeats)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1, e.g. "256,1024"."""
    return [positive_int(part) for part in text.split(",")]


def unit_fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (utilisations, shares)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds, timeouts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `run()` (blocked until its outputs are ready) over `repeats` calls after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                               settle: int = 0) -> dict[str, float]:
    """Median wall time of each named `run()`, the runs taking turns within every repeat.

    Two things compared on a shared, loaded machine see the same load only if they are timed in alternation;
    timing one fully and then the other lets a change of load in between masquerade as a speed ratio.
    `settle` untimed calls of the same run come right before each timed one: runtimes with their own thread
    pools (XLA's, PyTorch's OpenMP) keep spinning threads and leave the caches full of their data for a while
    after a call, which slows whatever runs next; settled, each timed call follows one of its own kind, as a
    step does inside a training loop.
    """
    for _ in range(warmup):
        for run in runs.values():
            jax.block_until_ready(run())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for _ in range(settle):
                jax.block_until_ready(run())
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the process's peak resident memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        json.dump(result, sys.stdout)
        print()
    else:
        print("\n".join(lines))
