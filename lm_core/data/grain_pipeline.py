"""A prepared dataset's training batches through grain: each host reads and packs only its own rows.

`PackedStream` packs a global batch on every host, reading every document of it. Here the packing is planned from
the documents' lengths alone: without `whole_documents`, greedy packing lays the stream's (input, target) pairs
end to end and cuts them every `seq_len`, so row r of the stream holds pairs [r·seq_len, (r+1)·seq_len) of it.
`PairIndex` maps a pair position to (stream document, offset) and back with a cumulative sum per epoch, so any row
can be built by random access. That makes the batches a grain `MapDataset` indexed by step: a host maps each step
to its own rows only (reading only their documents), grain prefetches them in threads or worker processes
(`mp_prefetch`), and nothing depends on how many hosts there are.

`GrainPackedLoader` is a `PreparedTokensLoader` whose batches come from that pipeline: the same batches byte for
byte, the same saved position (a stream document and offset, which the checkpoint stores), so a run resumes
exactly after kill -9 or SIGTERM, on another host count, or on the other loader. The position saved is that of
the batches the trainer has taken, not of those grain has prefetched.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from lm_core.data.packing import PackCursor
from lm_core.data.prepared import PreparedDataset, PreparedSplit, PreparedTokensLoader
from lm_core.data.views import epoch_order
from lm_core.errors import UserError

_LENGTH_CHUNK = 4096  # documents read per call while measuring a split's lengths
_ENDLESS = sys.maxsize  # training batches are an endless MapDataset: grain only ever asks for the next indices

Piece = tuple[int, int, int]  # (document index in the split, first pair, pairs taken)


def pair_counts(split: PreparedSplit) -> np.ndarray:
    """[documents] (input, target) pairs of each document: its tokens plus BOS and EOS, minus one. From the
    dataset's lengths file; a dataset prepared without one is read through once."""
    lengths = split.lengths()
    if lengths is not None:
        return lengths.astype(np.int64) + 1
    counts = np.empty(len(split), np.int64)
    for start in range(0, len(split), _LENGTH_CHUNK):
        stop = min(start + _LENGTH_CHUNK, len(split))
        counts[start:stop] = [len(ids) + 1 for ids, _ in split.read(range(start, stop))]
    return counts


class PairIndex:
    """Pair positions of the endless stream (epoch e visits the documents in `PackedStream`'s order for e)."""

    def __init__(self, counts: np.ndarray, *, seed: int, shuffle: bool):
        self.counts = counts  # [documents]
        self.num_documents = len(counts)
        self.pairs_per_epoch = int(counts.sum())
        self._seed, self._shuffle = seed, shuffle
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (order, cumulative pairs)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """([documents] document indices in visiting order, [documents + 1] pairs before each of them)."""
        if epoch not in self._epochs:
            order = epoch_order(self._seed, epoch, self.num_documents, self._shuffle)  # as PackedStream's
            for old in sorted(self._epochs)[:-1]:  # a row spans at most a few epochs: keep two
                del self._epochs[old]
            self._epochs[epoch] = order, np.concatenate([[0], np.cumsum(self.counts[order])])
        return self._epochs[epoch]

    def position(self, cursor: PackCursor) -> int:
        """The pair position where `cursor` (stream document, offset) points."""
        epoch, place = divmod(cursor.document, self.num_documents)
        return epoch * self.pairs_per_epoch + int(self.order(epoch)[1][place]) + cursor.offset

    def cursor(self, position: int) -> PackCursor:
        epoch, within = divmod(position, self.pairs_per_epoch)
        place = int(np.searchsorted(self.order(epoch)[1], within, side="right")) - 1
        return PackCursor(epoch * self.num_documents + place, within - int(self.order(epoch)[1][place]))

    def pieces(self, position: int, length: int) -> list[Piece]:
        """The documents (and their pair ranges) of the `length` pairs from `position`, in order."""
        pieces: list[Piece] = []
        while length > 0:  # one epoch's part of the range at a time
            epoch, within = divmod(position, self.pairs_per_epoch)
            order, before = self.order(epoch)
            stop = min(within + length, self.pairs_per_epoch)
            first, last = np.searchsorted(before, [within, stop - 1], side="right") - 1  # places of its ends
            begins = before[first:last + 1]  # [places] pairs before each document
            offsets = np.maximum(begins, within) - begins
            takes = np.minimum(before[first + 1:last + 2], stop) - begins - offsets
            pieces += zip(order[first:last + 1].tolist(), offsets.tolist(), takes.tolist(), strict=True)
            position, length = position + stop - within, length - (stop - within)
        return pieces


class HostRows:
    """grain's map function: step → this host's rows of that step's global batch (a picklable callable, so
    `mp_prefetch` workers run it; each thread or process opens the shards itself)."""

    def __init__(self, dataset: PreparedDataset, split: str, index: PairIndex, *, start: int, seq_len: int,
                 global_batch_size: int, first_row: int, rows: int):
        self._dataset, self._split_name, self._index = dataset, split, index
        self._start, self._seq_len, self._global_rows = start, seq_len, global_batch_size
        self._first_row, self._rows = first_row, rows
        manifest = dataset.manifest
        self._bos_id, self._eos_id = manifest["bos_id"], manifest["eos_id"]
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        # This host's rows are consecutive in the stream, so they are one range of pairs, packed in one go.
        first = self._start + (step * self._global_rows + self._first_row) * self._seq_len
        pieces = self._index.pieces(first, self._rows * self._seq_len)
        documents = self._split().read([document for document, _, _ in pieces])
        return pack_pieces(pieces, documents, self._rows, self._seq_len, bos_id=self._bos_id, eos_id=self._eos_id)

    def _split(self) -> PreparedSplit:
        if not hasattr(self._local, "split"):
            self._local.split = self._dataset.split(self._split_name)
        return self._local.split


def pack_pieces(pieces: list[Piece], documents: list[tuple[np.ndarray, int]], rows: int, seq_len: int, *,
                bos_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """`rows` full rows from consecutive `pieces` (which cover exactly rows x seq_len pairs) of `documents` (their
    ids and characters), as `PackedBatch.place` fills them piece by piece, computed per segment instead of per
    pair: a piece cut by a row end continues in the next row as its first segment, positions restart at each
    segment, and a segment's characters are its pairs' integer shares (`packing._chars_of_pairs`)."""
    total = rows * seq_len
    inputs, targets = piece_tokens(pieces, [ids for ids, _ in documents], bos_id=bos_id, eos_id=eos_id)
    offsets = np.array([offset for _, offset, _ in pieces], np.int64)  # [pieces]
    takes = np.array([take for _, _, take in pieces], np.int64)  # [pieces]
    piece_starts = np.cumsum(takes) - takes  # [pieces] first pair of each piece in the range
    # Segments: the pieces cut at row ends. Every row starts one; each lies in one piece.
    starts = np.union1d(piece_starts, np.arange(0, total, seq_len))  # [segments]
    lengths = np.diff(starts, append=total)  # [segments]
    piece = np.searchsorted(piece_starts, starts, side="right") - 1  # [segments]
    first_of_row = np.searchsorted(starts, np.arange(0, total, seq_len))  # [rows] its first segment
    chars = np.array([chars for _, chars in documents], np.int64)[piece]  # [segments] of the segment's document
    num_pairs = np.array([len(ids) + 1 for ids, _ in documents], np.int64)[piece]
    begin = starts - piece_starts[piece] + offsets[piece]  # [segments] first pair inside its document
    shares = chars * (begin + lengths) // num_pairs - chars * begin // num_pairs  # [segments]
    segment_in_row = np.arange(len(starts)) - first_of_row[starts // seq_len] + 1  # [segments] 1, 2, ... per row
    shape = (rows, seq_len)
    return {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape),
            "segment_ids": np.repeat(segment_in_row.astype(np.int32), lengths).reshape(shape),
            "positions": (np.arange(total, dtype=np.int32) - np.repeat(starts.astype(np.int32), lengths))
            .reshape(shape),
            "loss_mask": np.ones(shape, np.float32), "chars": np.add.reduceat(shares, first_of_row)}


def piece_tokens(pieces: list[Piece], ids: list[np.ndarray], *, bos_id: int, eos_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 [pairs of all pieces]: piece (document, offset, take) holds pairs offset .. offset +
    take - 1 of its document's BOS + ids + EOS sequence (m ids: m + 1 pairs), i.e. inputs at sequence positions
    [offset, offset + take) and targets one later. Sliced from the ids directly, so each output is one
    concatenation: an input can be BOS (offset 0) but never EOS, a target EOS (the piece ends the document) but
    never BOS."""
    bos, eos = np.array([bos_id], np.int32), np.array([eos_id], np.int32)
    input_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    for (_, offset, take), tokens in zip(pieces, ids, strict=True):
        stop = offset + take  # one past the last pair; <= len(tokens) + 1
        if offset == 0:
            input_parts.append(bos)
        input_parts.append(tokens[max(offset - 1, 0):stop - 1])
        target_parts.append(tokens[offset:stop])
        if stop == len(tokens) + 1:
            target_parts.append(eos)
    return (np.concatenate(input_parts).astype(np.int32, copy=False),
            np.concatenate(target_parts).astype(np.int32, copy=False))


class GrainPackedLoader(PreparedTokensLoader):
    """`PreparedTokensLoader` (same batches, same `state`/`restore`) whose batches a grain pipeline builds ahead:
    `threads` read in the training process, or `workers` > 0 processes do (`grain.IterDataset.mp_prefetch`)."""

    def __init__(self, split: PreparedSplit, tokenizer: Any, *, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True, workers: int = 0,
                 threads: int = 2, prefetch: int = 4):
        super().__init__(split, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count, shuffle=shuffle)
        if workers < 0 or threads < 0 or prefetch < 0:
            raise UserError(f"grain workers={workers}, threads={threads}, prefetch={prefetch}; valid: integers >= 0")
        self._workers, self._threads, self._prefetch = workers, threads, prefetch
        self._pairs = PairIndex(pair_counts(split), seed=seed, shuffle=shuffle)
        self._batches: Iterator[dict[str, np.ndarray]] | None = None  # built at the first next() after a restore
        self._start = self._taken = 0  # pair position the pipeline starts at; batches taken from it

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self._batches = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._start, self._taken = self._pairs.position(self._cursor), 0
            self._batches = iter(self._pipeline(self._start))
        batch = next(self._batches)
        self._taken += 1
        self._cursor = self._pairs.cursor(self._start + self._taken * self.global_batch_size * self.seq_len)
        return batch

    next = __next__

    def _pipeline(self, start: int) -> Any:
        import grain

        rows = HostRows(self._split.dataset, self._split.name, self._pairs, start=start, seq_len=self.seq_len,
                        global_batch_size=self.global_batch_size, first_row=self._row_start,
                        rows=self.per_host_batch_size)
        batches = grain.MapDataset.range(0, _ENDLESS).map(rows).to_iter_dataset(
            grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._prefetch))
        if self._workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside an absl app: defaults
                flags.FLAGS.mark_as_parsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        return batches


LOADERS = ("grain", "stream")
AUTO_THREADS = -1  # data.loader_threads: chosen by the backend (prefetch_threads)


def training_stream(split: PreparedSplit, tokenizer: Any, data: Any, *, seed: int, process_index: int,
                    process_count: int) -> PreparedTokensLoader:
    """The training batches of a prepared split as a run's `data` config section asks (data.loader)."""
    loader, whole_documents = data.get("loader", "grain"), data.get("whole_documents", False)
    if loader not in LOADERS:
        raise UserError(f"data.loader={loader!r} is not a loader; valid: {', '.join(LOADERS)}")
    options = dict(seq_len=data.seq_len, global_batch_size=data.global_batch_size, seed=seed,
                   process_index=process_index, process_count=process_count)
    if loader == "stream":
        return PreparedTokensLoader(split, tokenizer, whole_documents=whole_documents, **options)
    workers, threads = data.get("loader_workers", 0), data.get("loader_threads", AUTO_THREADS)
    if not isinstance(workers, int) or workers < 0:
        raise UserError(f"data.loader_workers={workers!r} is invalid; valid: an integer >= 0 (0: threads)")
    if not isinstance(threads, int) or threads < AUTO_THREADS:
        raise UserError(f"data.loader_threads={threads!r} is invalid; valid: an integer >= 0, or -1 (0 on a CPU "
                        "backend, else 2)")
    if whole_documents:
        raise UserError("data.loader=grain cannot keep whole_documents (its rows are planned from document lengths "
                        "alone); valid: data.loader=stream with data.whole_documents=True")
    return GrainPackedLoader(split, tokenizer, workers=workers, threads=prefetch_threads(threads), **options)


def prefetch_threads(configured: int) -> int:
    """grain's prefetch threads for `data.loader_threads`: AUTO_THREADS means none where JAX computes on the CPU
    (the train step already uses every core; on 2 cores a prefetch thread halves the rate, benchmarks/data.py)
    and 2 where an accelerator leaves the host's cores free to build the next batches during a step."""
    if configured != AUTO_THREADS:
        return configured
    import jax

    return 0 if jax.default_backend() == "cpu" else 2
