"""The resumable document stream every packed-batch loader is built on (LMDataLoader, moma's MixedModalLoader).

The stream: epoch e visits a loader's items in `views.epoch_order(seed, e)` order (identity without shuffle); epochs
follow each other without a break, and rows are packed greedily from the stream's documents (packing.pack_rows).
Stream document k comes from item `perm_{k // n}[k % n]`, so the whole position is ONE cursor (stream document,
pair offset inside it): `state()` is a dict of plain ints and `restore` makes the next batches byte-identical to
those of an uninterrupted loader; the state dict goes into the checkpoint as JSON. (A prepared dataset can be read
through grain instead, with the same batches and the same state: lm_core.data.grain_pipeline.)

Multi-host: every process packs the same global batch (same seed, same stream) and keeps its own
`global_batch_size // process_count` rows, so the hosts agree on the data without talking to each other.

A loader says how many items it has (`num_items`), how item `index` of epoch `epoch` becomes a document
(`_document_at`), and what a saved position is only valid for (`_stream_identity`); this class does the rest.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import Any

import numpy as np

from lm_core.data.packing import PackCursor, TokenizedDocument, pack_rows
from lm_core.data.views import epoch_order
from lm_core.errors import UserError

# Stream identity fields that some saved positions lack: content_digest those of older versions; tokenizer_fingerprint
# those of an LMDataLoader over the text a prepared dataset was made from (same stream, same content_digest), so a run
# can move from its text source to the prepared tokens of it and continue exactly.
OPTIONAL_IDENTITY = frozenset({"content_digest", "tokenizer_fingerprint"})


class PackedStream:
    """Infinite (repeat=True) or single-pass stream of this host's rows of each packed global batch.

    `next()` returns {"inputs", "targets", "segment_ids", "positions", "loss_mask": [per_host, seq_len],
    "chars": [per_host]} numpy arrays, plus whatever a subclass adds.
    """

    # How error messages name the loader and what a resume must keep the same.
    _description = "data loader"
    _resume_with = "the same data, tokenizer, seed and shuffle"

    def __init__(self, num_items: int, *, seq_len: int, global_batch_size: int, seed: int, process_index: int,
                 process_count: int, shuffle: bool, repeat: bool, whole_documents: bool = False):
        check_positive(seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count)
        if global_batch_size % process_count:
            raise UserError(f"global_batch_size={global_batch_size} is not divisible by process_count="
                            f"{process_count}; valid: a multiple of {process_count}")
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index={process_index} is out of range; valid: 0..{process_count - 1}")
        self.num_items = num_items
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.per_host_batch_size = global_batch_size // process_count
        self._row_start = process_index * self.per_host_batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._repeat = repeat
        self._whole_documents = whole_documents  # short documents never split over two rows (packing.pack_rows)
        self._cursor = PackCursor()
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> [num_items] order, current and next only

    # --- what a loader provides -----------------------------------------------------------------------------

    def _document_at(self, stream_index: int) -> TokenizedDocument | None:
        """Stream document `stream_index` (BOS ... EOS), or None past the end of a single-pass stream."""
        raise NotImplementedError

    def _stream_identity(self) -> dict[str, int]:
        """What a saved position is only meaningful for (e.g. offsets count tokens of one tokenizer)."""
        raise NotImplementedError

    # --- the stream -----------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._cursor.document // self.num_items

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._document_at(self._cursor.document) is None:
            raise StopIteration
        batch, self._cursor = pack_rows(self._document_at, self._cursor, self.seq_len, self.global_batch_size,
                                        whole_documents=self._whole_documents)
        return batch.rows(self._row_start, self._row_start + self.per_host_batch_size).as_dict()

    next = __next__

    def state(self) -> dict[str, int]:
        """Plain ints (JSON-serialisable): the stream position plus what the position is only valid for."""
        return {"document": self._cursor.document, "offset": self._cursor.offset, **self._stream_identity()}

    def restore(self, state: dict[str, Any]) -> None:
        name, valid = self._description, f"valid: a dict from {type(self).__name__}.state()"
        # Identity fields newer than a saved position (OPTIONAL_IDENTITY) cannot be checked against it: skipped.
        expected = {k: v for k, v in self._stream_identity().items() if k in state or k not in OPTIONAL_IDENTITY}
        missing = sorted({"document", "offset", *expected} - set(state))
        if missing:
            raise UserError(f"{name} state {state} lacks {missing}; {valid}")
        changed = {k: (state[k], v) for k, v in expected.items() if int(state[k]) != v}
        if changed:
            raise UserError(f"{name} state was saved for a different stream ("
                            + ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
                            + f"); valid: resume with {self._resume_with}")
        if int(state["document"]) < 0 or int(state["offset"]) < 0:
            raise UserError(f"{name} state {state} has a negative position; {valid}")
        self._cursor = PackCursor(int(state["document"]), int(state["offset"]))

    def _epoch_and_item(self, stream_index: int) -> tuple[int, int] | None:
        """(epoch, item index) of stream document `stream_index`, or None past the end of a single pass."""
        epoch, position = divmod(stream_index, self.num_items)
        if epoch > 0 and not self._repeat:
            return None
        return epoch, int(self._permutation(epoch)[position])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            order = epoch_order(self._seed, epoch, self.num_items, self._shuffle)
            # A batch spans at most two epochs unless epochs are tiny; keep the latest two.
            for old in sorted(self._permutations)[:-1]:
                del self._permutations[old]
            self._permutations[epoch] = order  # [num_items]
        return self._permutations[epoch]

    def _unseen_items_ahead(self, stream_index: int, count: int, seen: Container[int]) -> list[int]:
        """Item indices of the next `count` stream documents from `stream_index` not in `seen`, each once: what
        a loader tokenizes in one batched call."""
        indices: list[int] = []
        for k in range(stream_index, stream_index + count):
            located = self._epoch_and_item(k)
            if located is None:
                break
            if located[1] not in seen and located[1] not in indices:
                indices.append(located[1])
        return indices


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value <= 0:
            raise UserError(f"{name}={value!r} is invalid; valid: a positive integer")
