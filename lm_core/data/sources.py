"""Text sources by name: `get_text_source("builtin" | "files:<glob>" | "tfds:<name>[/<config>]")`.

A `TextSource` maps split names ("train", "validation") to random-access sequences of document strings, which
is all the loader needs. Paper packages add their own prefixes with `register_text_source` (e.g. image-text).

`tokens:<dir>` (a dataset experiments.prepare_data tokenised once, lm_core.data.prepared) is no text source: training
reads it directly, and asking it for text is refused in one line.

TFDS is imported only inside the builtin/tfds factories, so importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

from lm_core.errors import UserError

log = logging.getLogger(__name__)

VALIDATION_PER_MILLE = 50  # ~5% of documents go to validation when a source has no validation split


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


_FACTORIES: dict[str, TextSourceFactory] = {}
_FORMS: dict[str, str] = {}


def register_text_source(prefix: str, factory: TextSourceFactory, *, form: str | None = None,
                         overwrite: bool = False) -> None:
    """Make `get_text_source("<prefix>:<argument>")` call `factory(argument, data_dir=...)`.

    `form` is how the spec is written in error messages, e.g. "image_text:<name>".
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", prefix):
        raise ValueError(f"text source prefix {prefix!r} must be an identifier-like name")
    if prefix in _FACTORIES and not overwrite:
        raise ValueError(f"text source prefix '{prefix}' is already registered (pass overwrite=True to replace it)")
    _FACTORIES[prefix] = factory
    _FORMS[prefix] = form or f"{prefix}:<argument>"


def get_text_source(spec: str, *, data_dir: str | os.PathLike | None = None) -> TextSource:
    """The source a spec names. `data_dir` is where TFDS-backed sources are prepared/read."""
    prefix, _, argument = spec.partition(":")
    if prefix not in _FACTORIES:
        raise UserError(f"unknown text source '{spec}'; valid: {', '.join(_FORMS[p] for p in sorted(_FORMS))}")
    return _FACTORIES[prefix](argument, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Random-access views


class RecordTexts(Sequence[str]):
    """The UTF-8 text feature `key` of records [indices] of a random-access record source (e.g. tfds.data_source)."""

    def __init__(self, records: Any, key: str, indices: range | None = None):
        self._records = records
        self._key = key
        self._indices = indices if indices is not None else range(len(records))

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> RecordTexts: ...

    def __getitem__(self, index: int | slice) -> str | RecordTexts:
        if isinstance(index, slice):
            return RecordTexts(self._records, self._key, self._indices[index])
        value = self._records[self._indices[index]][self._key]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


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


def hash_split(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, validation) keys: ~5% to validation by a hash of the key, so a key's split never depends on the
    others. With >= 2 keys each split gets at least one; a lone key goes to both (nothing else to validate on)."""
    if len(keys) == 1:
        log.warning("only one document (%s): using it for both train and validation", keys[0])
        return list(keys), list(keys)
    buckets = {key: int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") for key in keys}
    validation = {key for key in keys if buckets[key] % 1000 < VALIDATION_PER_MILLE}
    if not validation:
        validation = {min(keys, key=lambda k: (buckets[k] % 1000, k))}
    if len(validation) == len(keys):
        validation.remove(max(keys, key=lambda k: (buckets[k] % 1000, k)))
    return [k for k in keys if k not in validation], [k for k in keys if k in validation]


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
    """Any TFDS text dataset, prepared as array_record if needed and read with random access (no TensorFlow).

    data_dir: the argument, else $LM_CORE_DATA_DIR, else TFDS's own default (~/tensorflow_datasets).
    """
    import tensorflow_datasets as tfds

    from lm_core.data import builtin_tfds

    if not name:
        raise UserError("text source 'tfds:' names no dataset; valid: tfds:<name>[/<config>], e.g. tfds:lm1b")
    data_dir = data_dir if data_dir is not None else os.environ.get(builtin_tfds.DATA_DIR_ENV)
    root = os.fspath(Path(data_dir).expanduser()) if data_dir else None

    def make_builder() -> Any:
        return tfds.builder(name, data_dir=root, file_format="array_record")

    try:
        builder = make_builder()
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(f"unknown TFDS dataset '{name}'{_close_matches(name, tfds)}; valid: a name from "
                        "tfds.list_builders() (optionally /<config>) or a builder registered by importing its module"
                        ) from e
    except ValueError as e:  # e.g. an unknown config
        raise UserError(f"cannot open TFDS dataset '{name}' ({' '.join(str(e).split())[:200]}); valid: "
                        "tfds:<name>[/<config>] with a config the dataset defines") from e
    key = _text_feature(builder.info.features, name)
    try:
        builder = builtin_tfds.prepared_builder(make_builder)
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; all mean "prepare it yourself"
        raise UserError(f"could not prepare TFDS dataset '{name}' in '{builder.data_dir_root}' "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); valid: a prepared dataset, e.g. "
                        f"`tfds build {name} --file_format=array_record --data_dir=DIR` then data_dir=DIR") from e
    records = builtin_tfds.data_sources(builder)
    splits = _train_validation(records, name)
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


def _train_validation(records: Mapping[str, Any], name: str) -> dict[str, tuple[Any, range]]:
    """train + validation, else train + test, else the last ~5% of train held out as validation."""
    if "train" not in records:
        raise UserError(f"TFDS dataset '{name}' has no 'train' split (splits: {sorted(records)}); "
                        "valid: a dataset with a train split")
    train = records["train"]
    for held_out in ("validation", "test"):
        if held_out in records:
            return {"train": (train, range(len(train))), "validation": (records[held_out],
                                                                         range(len(records[held_out])))}
    num_train = len(train)
    num_validation = max(1, num_train * VALIDATION_PER_MILLE // 1000) if num_train >= 2 else 0
    if num_validation == 0:
        return {"train": (train, range(num_train)), "validation": (train, range(num_train))}
    cut = num_train - num_validation
    return {"train": (train, range(cut)), "validation": (train, range(cut, num_train))}


def _close_matches(name: str, tfds: Any) -> str:
    matches = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(with_community_datasets=False), n=3)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


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
