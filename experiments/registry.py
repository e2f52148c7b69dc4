"""The reproductions `python -m experiments.reproduce` runs: one module per paper (plus the lm_core demo).

A reproduction module defines `NAME`, `TITLE` and `run(scale: str, workdir: Path) -> Section`; add its dotted name
to `REPRODUCTION_MODULES` and the main job runs it and links its report.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

SCALES = ("demo", "tiny", "small")

REPRODUCTION_MODULES = [
    "experiments.lm_report",
    "experiments.vocab_scaling.reproduce",
    "experiments.kv_prediction.reproduce",
]


@dataclasses.dataclass
class Section:
    title: str
    report: Path  # the reproduction's own REPORT.md
    summary: str  # a few lines of markdown for the top-level REPORT.md


def load_reproductions() -> list[ModuleType]:
    return [importlib.import_module(name) for name in REPRODUCTION_MODULES]
