"""Numeric columns from a CSV of runs, checked so that a bad file ends in one line naming file, line and column."""

from __future__ import annotations

import csv
import math

import numpy as np

from lm_core.errors import UserError


def read_header(path: str) -> list[str]:
    """The column names of the CSV at `path`, stripped of spaces; UserError if it cannot be read."""
    try:
        with open(path, newline="") as file:
            return [name.strip() for name in next(csv.reader(file), [])]
    except OSError as error:
        raise UserError(f"cannot read {path!r}: {error.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path!r} is not a text CSV file ({error}); valid: UTF-8 comma-separated values with a "
                        "header row") from None


def read_numeric_columns(path: str, required: tuple[str, ...],
                         optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The `required` columns (and those of `optional` present) as float64 arrays; headers may carry spaces.

    Raises UserError for an unreadable file, missing columns (naming what was found), a value that is not a
    number or not finite (naming line and column), or a file without data rows.
    """
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in header]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}"
                                f" (needs {', '.join(required)})")
            wanted = [*required, *(name for name in optional if name in header)]
            columns: dict[str, list[float]] = {name: [] for name in wanted}
            for line, row in enumerate(reader, start=2):
                row = {(key or "").strip(): value for key, value in row.items()}
                for name in wanted:
                    text = (row.get(name) or "").strip()
                    try:
                        value = float(text)
                    except ValueError:
                        raise UserError(f"{path} line {line}: {name}={text!r} is not a number") from None
                    if not math.isfinite(value):
                        raise UserError(f"{path} line {line}: {name}={text} is not finite")
                    columns[name].append(value)
    except OSError as error:
        raise UserError(f"cannot read {path!r}: {error.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path!r} is not a text CSV file ({error}); valid: UTF-8 comma-separated values with a "
                        "header row") from None
    if not columns[required[0]]:
        raise UserError(f"{path}: no data rows")
    return {name: np.asarray(values) for name, values in columns.items()}
