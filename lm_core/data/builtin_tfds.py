"""The builtin corpus as a TFDS dataset (`lm_core_builtin_text`, array_record), read without TensorFlow.

Why TFDS for a corpus we can build in seconds: the same path (prepare once into a data_dir, then random access
with `tfds.data_source`) serves every TFDS catalogue dataset, so the builtin corpus exercises exactly the reader
real experiments use. Importing this module imports tensorflow_datasets; `lm_core.data` only imports it on demand.

Preparation happens once per data_dir: TFDS writes into an `incomplete.*` directory and renames it, and a file
lock keeps two local processes from preparing the same dataset at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from lm_core.data import builtin_corpus
from lm_core.errors import UserError

BUILTIN_NAME = "lm_core_builtin_text"
DATA_DIR_ENV = "LM_CORE_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/lm_core/tfds"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $LM_CORE_DATA_DIR, else ~/.cache/lm_core/tfds."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


class LmCoreBuiltinText(tfds.core.GeneratorBasedBuilder):
    """Python's documentation topics and the standard library's docstrings and comments (see builtin_corpus)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Topics, module docstrings and comment blocks; ~5% validation by title hash."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly (not dataset_info_from_configs): this builder has no package metadata files.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"English text shipped with Python (built with Python {sys.version.split()[0]}): "
                         "pydoc topics, standard-library docstrings and comment blocks."),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
        splits = builtin_corpus.split_corpus(builtin_corpus.build_corpus())
        return {name: self._generate_examples(docs) for name, docs in splits.items()}

    def _generate_examples(self, documents: list[builtin_corpus.Document]) -> Iterator[tuple[str, dict[str, str]]]:
        for doc in documents:
            yield doc.title, {"text": doc.text, "title": doc.title}


def builtin_builder(data_dir: str | os.PathLike | None = None) -> LmCoreBuiltinText:
    """The builtin dataset's builder, prepared in `resolve_data_dir(data_dir)` (built there on first use)."""
    root = os.fspath(resolve_data_dir(data_dir))
    return prepared_builder(lambda: LmCoreBuiltinText(data_dir=root, file_format="array_record"))


def prepared_builder(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    """A builder whose dataset is on disk: `download_and_prepare` unless already prepared, serialised across
    local processes by a lock file.

    Returns a builder made AFTER preparation: one made before it (e.g. while another process was preparing)
    has no split information.
    """
    builder = make_builder()
    if _is_prepared(builder):
        return builder
    root = Path(os.fspath(builder.data_dir_root))
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{builder.name}.lock"):
        if not _is_prepared(builder):  # else another process finished while we waited
            try:
                builder.download_and_prepare(file_format="array_record")
            except OSError:
                # Hosts sharing a filesystem can still race on TFDS's final rename; the loser reads the winner's.
                if not _is_prepared(builder):
                    raise
    return make_builder()


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # TFDS renames the finished directory into place, so dataset_info.json there means complete. (Same test as
    # builder.is_prepared(), which also logs a warning every time the answer is no.)
    return (Path(os.fspath(builder.data_dir)) / "dataset_info.json").is_file()


def data_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """{split: random-access source} for a prepared builder; records are dicts of numpy values / bytes."""
    try:
        return dict(builder.as_data_source())
    except (NotImplementedError, ValueError) as e:
        raise UserError(f"TFDS dataset '{builder.name}' in '{builder.data_dir}' is not stored as array_record "
                        f"({' '.join(str(e).split())[:160]}); valid: a dataset prepared with "
                        "file_format=array_record, e.g. `tfds build --file_format=array_record`") from e


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock, TFDS's rename still keeps data whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
