"""Random-access views of a collection, and the order epochs visit one.

A view is a Sequence over some indices of an underlying collection (a TFDS record source, a folder of files, a
rendered stream): `len()`, item access that reads or computes one item, and slicing that gives another view
without reading anything. Every loader in the repository walks a view epoch after epoch in `epoch_order`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, TypeVar, overload

import numpy as np

ItemT = TypeVar("ItemT")


class IndexedView(Sequence[ItemT]):
    """A Sequence over `indices` of an underlying collection; subclasses say how to read item i (`_item`)."""

    def __init__(self, indices: range | Sequence[int]):
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> ItemT: ...

    @overload
    def __getitem__(self, index: slice) -> IndexedView[ItemT]: ...

    def __getitem__(self, index: int | slice) -> ItemT | IndexedView[ItemT]:
        if isinstance(index, slice):
            view = copy.copy(self)  # shares the underlying collection
            view._indices = self._indices[index]
            return view
        return self._item(self._indices[index])

    def _item(self, index: int) -> ItemT:
        """Item `index` of the UNDERLYING collection (already mapped through the view's indices)."""
        raise NotImplementedError


class RecordTexts(IndexedView[str]):
    """The UTF-8 text feature `key` of records [indices] of a random-access record source (e.g. tfds.data_source)."""

    def __init__(self, records: Any, key: str, indices: range | None = None):
        super().__init__(indices if indices is not None else range(len(records)))
        self._records = records
        self._key = key

    def _item(self, index: int) -> str:
        value = self._records[index][self._key]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def epoch_order(seed: int, epoch: int, count: int, shuffle: bool = True) -> np.ndarray:
    """[count] item indices in the order epoch `epoch` visits them: a permutation seeded by (seed, epoch), so any
    epoch's order is known without replaying the ones before it; `shuffle=False` visits them in order."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)
