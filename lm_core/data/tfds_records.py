"""Any TFDS dataset as random-access records with a train and a validation split (`tfds.data_source`, no
TensorFlow), for the `tfds:<name>[/<config>]` text and image-caption sources.

The dataset is prepared as array_record when it is not yet (which downloads: users without network pass a
`data_dir` where they built it). data_dir: the argument, else $LM_CORE_DATA_DIR, else TFDS's own default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lm_core.data.splits import train_validation
from lm_core.errors import UserError, brief

FeaturesT = TypeVar("FeaturesT")


def open_tfds(name: str, data_dir: str | os.PathLike | None, *, kind: str, example: str, wanted: str,
              read_features: Callable[[Any], FeaturesT]) -> tuple[FeaturesT, dict[str, tuple[Any, range]]]:
    """(what `read_features(builder.info.features)` makes of the features, {split: (records, indices)}).

    `kind` ("text source") and `example` ("tfds:lm1b") word the errors; `wanted` says which features a dataset
    needs ("a Text feature"). The features are read before preparing, so a dataset of the wrong kind is refused
    before anything is downloaded.
    """
    import tensorflow_datasets as tfds

    from lm_core.data import builtin_tfds

    if not name:
        raise UserError(f"{kind} 'tfds:' names no dataset; valid: tfds:<name>[/<config>], e.g. {example}")
    data_dir = data_dir if data_dir is not None else os.environ.get(builtin_tfds.DATA_DIR_ENV)
    root = os.fspath(Path(data_dir).expanduser()) if data_dir else None

    def make_builder() -> Any:
        return tfds.builder(name, data_dir=root, file_format="array_record")

    builder = _builder(make_builder, name, wanted)
    features = read_features(builder.info.features)
    try:
        prepared = builtin_tfds.prepared_builder(make_builder)
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; all mean "prepare it yourself"
        raise UserError(f"could not prepare TFDS dataset '{name}' in '{builder.data_dir_root}' "
                        f"({type(e).__name__}: {brief(e)[:160]}); valid: a prepared dataset, e.g. "
                        f"`tfds build {name} --file_format=array_record --data_dir=DIR` then data_dir=DIR") from e
    return features, train_validation(builtin_tfds.data_sources(prepared), name)


def _builder(make_builder: Callable[[], Any], name: str, wanted: str) -> Any:
    """The dataset's builder, or one line saying why there is none."""
    import tensorflow_datasets as tfds

    try:
        return make_builder()
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(f"unknown TFDS dataset '{name}'{_close_matches(name)}; valid: a name from "
                        f"tfds.list_builders() (optionally /<config>) with {wanted}, or a builder registered by "
                        "importing its module") from e
    except ValueError as e:  # e.g. an unknown config
        raise UserError(f"cannot open TFDS dataset '{name}' ({brief(e)[:200]}); valid: tfds:<name>[/<config>] "
                        "with a config the dataset defines") from e
    except ModuleNotFoundError as e:  # some builders import TensorFlow or their own packages just to be made
        reason = " ".join(str(e).split()).rsplit(": ", 1)[-1][:120]  # TFDS prefixes its builder arguments
        raise UserError(f"cannot open TFDS dataset '{name}': a module its builder needs is not installed "
                        f"({reason}); valid: install it, or a dataset whose builder needs none") from e


def _close_matches(name: str) -> str:
    import tensorflow_datasets as tfds

    matches = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(with_community_datasets=False), n=3)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""
