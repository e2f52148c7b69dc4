"""Text sources by name: `get_text_source("builtin" | "files:<glob>" | "tfds:<name>[/<config>]")`.

A `TextSource` maps split names ("train", "validation") to random-access sequences of document strings, which
is all the loader needs. Paper packages add their own prefixes with `register_text_source` (e.g. image-text).

`tokens:<dir>` (a dataset experiments.prepare_data tokenised once, lm_core.data.prepared) is no text source: training
reads it directly, and asking it for text is refused in one line.

TFDS is imported only inside the builtin/tfds factories, so importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lm_core.data.registry import SourceRegistry
from lm_core.data.splits import hash_split
from lm_core.data.tfds_records import open_tfds
from lm_core.data.views import RecordTexts
from lm_core.errors import UserError


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Named splits of documents. Each split is a Sequence[str]: len() and random access by index."""

    name: str
    splits: Mapping[str, Sequence[str]]

    def split(self, name: str) -> Sequence[str]:
        if name not in self.splits:
            raise UserError(f"text source '{self.name}' has no split '{name}'; valid: {sorted(self.splits)}")
        return self.splits[name]


class TextSourceFactory(Protocol):
    def __call__(self, argument: str, *, data_dir: str | os.PathLike | None) -> TextSource: ...


TEXT_SOURCES: SourceRegistry[TextSource] = SourceRegistry("text source")


def register_text_source(prefix: str, factory: TextSourceFactory, *, form: str | None = None,
                         overwrite: bool = False) -> None:
    """Make `get_text_source("<prefix>:<argument>")` call `factory(argument, data_dir=...)`.

    `form` is how the spec is written in error messages, e.g. "image_text:<name>".
    """
    TEXT_SOURCES.register(prefix, factory, form=form, overwrite=overwrite)


def get_text_source(spec: str, *, data_dir: str | os.PathLike | None = None) -> TextSource:
    """The source a spec names. `data_dir` is where TFDS-backed sources are prepared/read."""
    return TEXT_SOURCES.get(spec, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------------------------
# builtin


def _builtin_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    if argument:
        raise UserError(f"text source 'builtin:{argument}' takes no argument; valid: builtin")
    from lm_core.data import builtin_tfds

    sources = builtin_tfds.data_sources(builtin_tfds.builtin_builder(data_dir))
    return TextSource("builtin", {split: RecordTexts(records, "text") for split, records in sources.items()})


# ---------------------------------------------------------------------------------------------------------------
# files:<glob>


def _files_source(pattern: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    """One document per file (sorted paths); a single file is split into paragraphs instead."""
    del data_dir  # files are read where they are
    if not pattern:
        raise UserError("text source 'files:' has an empty glob; valid: files:<glob>, e.g. files:corpus/*.txt")
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise UserError(f"text source 'files:{pattern}' matches no files; valid: a glob of UTF-8 text files, "
                        "e.g. files:corpus/**/*.txt")
    root = _glob_root(pattern)
    documents = {_split_key(path, root): text for path in paths if (text := _read_utf8(path)).strip()}
    if not documents:
        raise UserError(f"text source 'files:{pattern}' matches only empty files ({len(paths)}); valid: a glob "
                        "matching at least one non-empty UTF-8 text file")
    if len(documents) == 1:
        (key, text), = documents.items()
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        documents = {f"{key}#{i}": paragraph for i, paragraph in enumerate(paragraphs)}
    train_keys, validation_keys = hash_split(sorted(documents))
    return TextSource(f"files:{pattern}", {"train": [documents[k] for k in train_keys],
                                           "validation": [documents[k] for k in validation_keys]})


def _glob_root(pattern: str) -> str:
    """The directory part of the glob before its first wildcard, so split keys don't depend on the cwd."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


def _split_key(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _read_utf8(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"file '{path}' is not valid UTF-8 ({e.reason} at byte {e.start}); valid: UTF-8 text "
                        "files (convert it, or narrow the files: glob)") from e


# ---------------------------------------------------------------------------------------------------------------
# tfds:<name>[/<config>]


def _tfds_source(name: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    """Any TFDS text dataset, prepared as array_record if needed and read with random access (no TensorFlow)."""
    key, splits = open_tfds(name, data_dir, kind="text source", example="tfds:lm1b", wanted="a Text feature",
                            read_features=lambda features: _text_feature(features, name))
    return TextSource(f"tfds:{name}", {split: RecordTexts(source, key, indices)
                                       for split, (source, indices) in splits.items()})


def _text_feature(features: Any, name: str) -> str:
    import tensorflow_datasets as tfds

    text_keys = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
    if "text" in text_keys:
        return "text"
    if not text_keys:
        raise UserError(f"TFDS dataset '{name}' has no Text feature (features: {sorted(features.keys())}); "
                        "valid: a dataset with a top-level tfds.features.Text feature")
    return text_keys[0]


# ---------------------------------------------------------------------------------------------------------------
# tokens:<dir>


def _tokens_source(directory: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    """A prepared dataset (lm_core.data.prepared) holds token ids, not text: registered so that whoever asks for
    its text learns what it is, in one line, instead of "unknown text source"."""
    del data_dir
    raise UserError(f"'tokens:{directory}' is a pre-tokenised dataset (token ids, no text), read only by training "
                    "(experiments.train_lm); valid here: a text source, e.g. the one its manifest.json names")


register_text_source("builtin", _builtin_source, form="builtin")
register_text_source("files", _files_source, form="files:<glob>")
register_text_source("tfds", _tfds_source, form="tfds:<name>[/<config>]")
register_text_source("tokens", _tokens_source, form="tokens:<prepared dir> (training only)")

__all__ = ["RecordTexts", "TextSource", "TextSourceFactory", "get_text_source", "hash_split",
           "register_text_source"]
