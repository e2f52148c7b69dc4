"""A deterministic, exactly resumable stream of packed next-token batches.

The stream: epoch e visits the documents in `permutation(seed, e)` order (identity without shuffle); epochs
follow each other without a break, and rows are packed greedily from that document stream (see packing.py).
Document k of the stream is document `perm_{k // n}[k % n]`, so the whole position is ONE cursor
(stream document, pair offset inside it): `state()` is a dict of plain ints and `restore` makes the next batches
byte-identical to those of an uninterrupted loader. That is simpler than a grain pipeline with packing and
gives the same guarantee; the state dict goes into the checkpoint as JSON.

Multi-host: every process packs the same global batch (same seed, same stream) and keeps its own
`global_batch_size // process_count` rows, so the hosts agree on the data without talking to each other. The
price is that every host tokenizes every document; each document is tokenized once per loader and kept in memory
(fine for corpora of a few hundred MB of text; bigger ones want a pre-tokenized TFDS dataset).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lm_core.data.packing import PackCursor, TokenizedDocument, pack_rows, tokenized_document
from lm_core.errors import UserError
from lm_core.tokenizer import TextTokenizer

# Documents tokenized per encode_batch call: big enough for sentencepiece's threads, small enough that the first
# batch arrives quickly.
_TOKENIZE_CHUNK = 256


class LMDataLoader:
    """Infinite (repeat=True) or single-pass stream of this host's rows of each global batch.

    `next()` returns {"inputs", "targets", "segment_ids", "positions", "loss_mask": [per_host, seq_len],
    "chars": [per_host]} as numpy arrays.
    """

    def __init__(self, source_split: Sequence[str], tokenizer: TextTokenizer, *, seq_len: int,
                 global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, repeat: bool = True, whole_documents: bool = False):
        _check_positive(seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count)
        if global_batch_size % process_count:
            raise UserError(f"global_batch_size={global_batch_size} is not divisible by process_count="
                            f"{process_count}; valid: a multiple of {process_count}")
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index={process_index} is out of range; valid: 0..{process_count - 1}")
        if len(source_split) == 0:
            raise UserError("the data split has no documents; valid: a split with at least one document")
        self._documents = source_split
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.per_host_batch_size = global_batch_size // process_count
        self._row_start = process_index * self.per_host_batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._repeat = repeat
        self._whole_documents = whole_documents  # short documents never split over two rows (packing.pack_rows)
        self._cursor = PackCursor()
        self._cache: dict[int, TokenizedDocument] = {}  # document index -> tokens
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> [num_documents] order, current and next only

    @property
    def num_documents(self) -> int:
        return len(self._documents)

    @property
    def epoch(self) -> int:
        return self._cursor.document // self.num_documents

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
        expected = self._stream_identity()
        missing = sorted({"document", "offset", *expected} - set(state))
        if missing:
            raise UserError(f"data loader state {state} lacks {missing}; valid: a dict from LMDataLoader.state()")
        changed = {k: (state[k], v) for k, v in expected.items() if int(state[k]) != v}
        if changed:
            raise UserError("data loader state was saved for a different stream ("
                            + ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
                            + "); valid: resume with the same data, tokenizer, seed and shuffle")
        if int(state["document"]) < 0 or int(state["offset"]) < 0:
            raise UserError(f"data loader state {state} has a negative position; valid: a dict from "
                            "LMDataLoader.state()")
        self._cursor = PackCursor(int(state["document"]), int(state["offset"]))

    def _stream_identity(self) -> dict[str, int]:
        """What a saved position is only meaningful for (offsets count tokens of this tokenizer)."""
        return {"seed": self._seed, "num_documents": self.num_documents, "shuffle": int(self._shuffle),
                "vocab_size": self._tokenizer.vocab_size}

    def _document_index(self, stream_index: int) -> int | None:
        epoch, position = divmod(stream_index, self.num_documents)
        if epoch > 0 and not self._repeat:
            return None
        return int(self._permutation(epoch)[position])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if self._shuffle:
                order = np.random.default_rng([self._seed, epoch]).permutation(self.num_documents)
            else:
                order = np.arange(self.num_documents)
            # A batch spans at most two epochs unless epochs are tiny; keep the latest two.
            for old in sorted(self._permutations)[:-1]:
                del self._permutations[old]
            self._permutations[epoch] = order  # [num_documents]
        return self._permutations[epoch]

    def _document_at(self, stream_index: int) -> TokenizedDocument | None:
        index = self._document_index(stream_index)
        if index is None:
            return None
        if index not in self._cache:
            self._tokenize_ahead(stream_index)
        return self._cache[index]

    def _tokenize_ahead(self, stream_index: int) -> None:
        """Tokenize the next chunk of not-yet-seen documents of the stream in one (multi-threaded) call."""
        indices: list[int] = []
        for k in range(stream_index, stream_index + _TOKENIZE_CHUNK):
            index = self._document_index(k)
            if index is None:
                break
            if index not in self._cache and index not in indices:
                indices.append(index)
        texts = [self._documents[i] for i in indices]
        for index, text, ids in zip(indices, texts, self._tokenizer.encode_batch(texts), strict=True):
            self._cache[index] = tokenized_document(ids, len(text), bos_id=self._tokenizer.bos_id,
                                                    eos_id=self._tokenizer.eos_id)


def iter_eval_batches(split: Sequence[str], tokenizer: TextTokenizer, seq_len: int, batch_size: int,
                      max_batches: int | None = None, *, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split` in order (no shuffle); the last batch is padded with loss_mask 0.

    `batch_size` is global: with several processes each gets its rows of every batch, as in training.
    """
    loader = LMDataLoader(split, tokenizer, seq_len=seq_len, global_batch_size=batch_size, seed=0,
                          process_index=process_index, process_count=process_count, shuffle=False, repeat=False)
    yield from itertools.islice(loader, max_batches)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value <= 0:
            raise UserError(f"{name}={value!r} is invalid; valid: a positive integer")

