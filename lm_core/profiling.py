"""A `jax.profiler` trace of a window of training steps, for TensorBoard's profile plugin or Perfetto.

`config.profile_steps = "FIRST:LAST"` (both inclusive, counted like the trainer's steps from 1) traces steps FIRST
to LAST into `workdir/profile/plugins/profile/<time>/<host>.xplane.pb` (+ `.trace.json.gz`); open it with
`tensorboard --logdir=<workdir>/profile` (Profile tab, from tensorboard-plugin-profile) or load the
`.trace.json.gz` in Perfetto's trace viewer.
Only process 0 traces: one host's view is what one usually reads, and one folder has no clashing host names.
Start the window after the first steps, or the trace is mostly compilation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from lm_core.errors import UserError


def parse_profile_steps(value: Any, steps: int) -> tuple[int, int] | None:
    """`config.profile_steps` as (first, last), both inclusive, or None for "" (no profiling).

    A window that ends after `steps` is refused, not clipped: it is a typo or a config meant for a longer run, and
    a silently shorter trace would be read as the one asked for."""
    example = f"{min(2, steps)}:{steps}"
    valid = f"valid: '' (off) or 'FIRST:LAST' with 1 <= FIRST <= LAST <= steps ({steps}), e.g. '{example}'"
    if not isinstance(value, str):
        raise UserError(f"profile_steps={value!r} is not a step window; {valid}")
    if not value.strip():
        return None
    first_text, colon, last_text = value.partition(":")
    try:
        first, last = int(first_text), int(last_text)
    except ValueError:
        first = last = 0
    if not colon or not 1 <= first <= last:
        raise UserError(f"profile_steps={value!r} is not a step window; {valid}")
    if last > steps:
        raise UserError(f"profile_steps={value!r} ends after the run's last step (steps={steps}); {valid}")
    return first, last


class ProfileWindow:
    """Starts a trace before the first step of the window this process runs and stops it after the window's last.

    A run resumed past the window traces nothing; one resumed inside it traces the window's remaining steps (the
    killed attempt's trace was never written: jax writes a trace when it stops). A run stopped inside the window
    (signal, divergence) writes the steps it traced on `close`."""

    def __init__(self, window: tuple[int, int] | None, directory: Path, *, enabled: bool = True):
        self.window = window if enabled else None
        self.directory = directory
        self._first_traced: int | None = None  # set while a trace is running
        self._last_traced = 0
        self._step_annotation: Any = None

    def before_step(self, step: int) -> None:
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return
        if self._first_traced is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self._first_traced = step
        self._last_traced = step
        # Marks the step in the trace, so the profile plugin's overview shows time per step.
        self._step_annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self._step_annotation.__enter__()

    def after_step(self, step: int, outputs: Any) -> None:
        """After step `step`, given what it computed: at the window's end, wait for that work and write the trace."""
        if self._first_traced is None:
            return
        if step >= self.window[1]:
            jax.block_until_ready(outputs)  # dispatch is asynchronous: without this the trace ends before the work
        self._end_step_annotation()
        if step >= self.window[1]:
            self._stop()

    def close(self) -> None:
        if self._first_traced is not None:
            self._end_step_annotation()
            self._stop()

    def _end_step_annotation(self) -> None:
        if self._step_annotation is not None:
            self._step_annotation.__exit__(None, None, None)
            self._step_annotation = None

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        print(f"profile: steps {self._first_traced}-{self._last_traced} traced into {self.directory}", flush=True)
        self._first_traced = None
        self.window = None  # one trace per run
