"""Directories written whole or not at all: `staged_directory(target)` yields a temporary sibling to fill and
renames it to `target` only when the block succeeds, so an interrupted or failed writer leaves `target` absent
(or the empty directory it was), never half written. Used by every writer of a directory of outputs (a prepared
dataset, a Hugging Face export, an imported workdir). `replaced_directory(target)` is the same for a directory
that may already hold an older version (a saved tokenizer): the old one is replaced only by a complete new one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lm_core.errors import UserError


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` (empty or absent: the caller checks), renamed to it when the block
    succeeds and deleted when it fails or is interrupted."""
    target = target.absolute()
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer that had this process id
        staging.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"cannot write next to '{target}' ({error.strerror or error}); valid: a path in a "
                        "writable directory") from None
    try:
        yield staging
        if target.exists():
            target.rmdir()  # the empty directory the caller checked; a file written there since fails here
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replaced_directory(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to fill; when the block succeeds it replaces `target` (an existing one is
    moved aside first and deleted after, so a reader never sees a half-written directory), when it fails or is
    interrupted `target` is untouched."""
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer that had this process id
    staging.mkdir()
    try:
        yield staging
        _swap_in(staging, target, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path, old: Path) -> None:
    """`staging` becomes `target`; an existing `target` is moved to `old` first, put back if the rename fails
    (never lost), and deleted once the new one is in place."""
    moved = target.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if moved:
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
