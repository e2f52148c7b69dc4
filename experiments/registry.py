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
    "experiments.moma.reproduce",
]

# Modules that register extra data sources with lm_core.data when imported (lm_core cannot import the papers):
# retrieval:<source> and knowledge:<source> (kv_prediction's recall and closed-book documents mixed into a corpus),
# and MoMa's builtin / images: image sources, whose captions `image_captions:<image spec>` reads as text.
TEXT_SOURCE_MODULES = [
    "kv_prediction.retrieval",
    "kv_prediction.knowledge",
    "moma.images",
]


def register_text_sources() -> None:
    """Make every paper's text sources available to `--config.data.source` of the shared entrypoints."""
    for name in TEXT_SOURCE_MODULES:
        importlib.import_module(name)


@dataclasses.dataclass
class Section:
    title: str
    report: Path  # the reproduction's own REPORT.md
    summary: str  # a few lines of markdown for the top-level REPORT.md


def load_reproductions() -> list[ModuleType]:
    return [importlib.import_module(name) for name in REPRODUCTION_MODULES]
