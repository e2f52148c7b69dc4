"""The bundled tasks' data: a JSON-lines file next to the task's yaml, read into memory (no network, no cache).

The task yamls name their file in `dataset_kwargs: {data_files: <name>}`. `datasets.load_dataset("json", ...)`
would resolve that name against the working directory, so lm_eval would find the file only when run from here;
this loader (the yaml's `custom_dataset`) resolves it against this directory instead, from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: str, **metadata: object) -> datasets.DatasetDict:
    """{"test": one row per line of HERE/data_files}; `metadata` (lm_eval passes the task's) is not used."""
    del metadata
    path = HERE / data_files
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
