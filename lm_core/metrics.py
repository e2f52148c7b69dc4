"""Where a run's numbers go: `metrics.jsonl` (one JSON object per logged step), TensorBoard, optionally Weights &
Biases (lm_core.wandb_writer), a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from lm_core.atomic_files import write_jsonl_atomically
from lm_core.wandb_writer import WandbOptions, WandbWriter


class MetricsLog:
    """Appends metric rows to `workdir/metrics.jsonl`, TensorBoard event files and, with `wandb` options, a W&B run.

    On resume, rows after the restored step are dropped first (a run killed after logging but before its next
    checkpoint will log those steps again), so the file always reads as one uninterrupted run.
    """

    def __init__(self, workdir: Path, *, resume_step: int, tensorboard: bool = True, is_main: bool = True,
                 wandb: WandbOptions | None = None):
        self.path = workdir / "metrics.jsonl"
        self.is_main = is_main
        if is_main:
            truncate_after(self.path, resume_step)
        self._writer = None
        if tensorboard and is_main:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)
        self._wandb = WandbWriter(workdir, wandb) if wandb is not None and is_main else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._writer is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(name, value, row["step"])
        if self._wandb is not None:
            self._wandb.write(row)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close the writers; `exit_code` (0 done, 1 diverged, 143 stopped) is what W&B records."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close(exit_code)
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    write_jsonl_atomically(path, kept)


class Progress:
    """One line per log step: step, loss, throughput and time left."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.start_time = time.monotonic()

    def line(self, step: int, row: dict[str, Any]) -> str:
        done = step - self.start_step
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}", f"loss {row['loss']:.4f}"]
        if "eval_loss" in row:
            parts.append(f"eval {row['eval_loss']:.4f}")
        parts += [f"{row.get('tokens_per_s', 0):,.0f} tok/s", f"mfu {100 * row.get('mfu', 0):.1f}%",
                  f"eta {format_seconds(eta)}"]
        return " | ".join(parts)

    def print(self, step: int, row: dict[str, Any]) -> None:
        print(self.line(step, row), file=sys.stdout, flush=True)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
