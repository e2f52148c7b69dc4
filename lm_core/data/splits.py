"""Train / validation splits of sources that do not come with both: ~5% of documents held out.

- `hash_split`: by a hash of each document's key (files, image folders), so adding a document never moves another.
- `train_validation`: a TFDS dataset's own validation (or test) split, else the last ~5% of its train split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lm_core.errors import UserError

log = logging.getLogger(__name__)

VALIDATION_PER_MILLE = 50  # ~5% of documents go to validation when a source has no validation split


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


def train_validation(records: Mapping[str, Any], name: str) -> dict[str, tuple[Any, range]]:
    """train + validation, else train + test, else the last ~5% of train held out as validation (a one-record
    train split is used for both: there is nothing else to validate on)."""
    if "train" not in records:
        raise UserError(f"TFDS dataset '{name}' has no 'train' split (splits: {sorted(records)}); "
                        "valid: a dataset with a train split")
    train = records["train"]
    for held_out in ("validation", "test"):
        if held_out in records:
            return {"train": (train, range(len(train))),
                    "validation": (records[held_out], range(len(records[held_out])))}
    num_train = len(train)
    num_validation = max(1, num_train * VALIDATION_PER_MILLE // 1000) if num_train >= 2 else 0
    if num_validation == 0:
        return {"train": (train, range(num_train)), "validation": (train, range(num_train))}
    cut = num_train - num_validation
    return {"train": (train, range(cut)), "validation": (train, range(cut, num_train))}
