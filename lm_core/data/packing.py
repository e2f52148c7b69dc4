"""Greedy sequential packing of tokenized documents into fixed-length rows for next-token training.

Convention (what every array means):
- A document is `[BOS] + pieces + [EOS]`: m tokens give m - 1 (input, target) pairs `(d[j], d[j+1])`. Packing
  places PAIRS, so `targets[r, i]` is always the next token of the same document as `inputs[r, i]`: BOS is never
  a target and EOS never an input, and no position predicts across a document boundary.
- `segment_ids`: 1, 2, 3, ... for the documents (or document pieces) in a row, 0 for padding. The model masks
  attention to the same segment.
- `positions`: restart at 0 at the start of every segment. A document longer than the space left in a row
  continues at the start of the next row as a new segment, again from position 0 (its first row's tokens are
  not visible there, exactly as if the continuation were a document of its own; positions stay < seq_len).
- `loss_mask`: float32, 1 on every pair, 0 on padding.
- `chars`: characters of source text per row. A document's characters are spread over its pairs
  (pair j of P owns chars[floor(C*j/P) .. floor(C*(j+1)/P))), so per-row counts are integers and their sum over
  all rows is exactly the documents' total characters — the unit vocabulary-scaling work measures data in.

Rows are filled in document order with no reordering (deterministic, and resumable from a (document, offset)
cursor); every row but the last of a finite stream is full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from lm_core.tokenizer import BOS_ID, EOS_ID

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "chars")


@dataclasses.dataclass(frozen=True)
class TokenizedDocument:
    tokens: np.ndarray  # [m] int32, BOS + pieces + EOS, m >= 2
    chars: int  # characters of the source text

    @property
    def num_pairs(self) -> int:
        return len(self.tokens) - 1


@dataclasses.dataclass(frozen=True)
class PackCursor:
    """Where packing resumes: the next pair is `offset` of document `document` (an index into the stream)."""

    document: int = 0
    offset: int = 0


@dataclasses.dataclass
class PackedBatch:
    inputs: np.ndarray  # [rows, seq_len] int32
    targets: np.ndarray  # [rows, seq_len] int32
    segment_ids: np.ndarray  # [rows, seq_len] int32, 0 = padding
    positions: np.ndarray  # [rows, seq_len] int32
    loss_mask: np.ndarray  # [rows, seq_len] float32
    chars: np.ndarray  # [rows] int64

    @classmethod
    def zeros(cls, num_rows: int, seq_len: int) -> PackedBatch:
        shape = (num_rows, seq_len)
        return cls(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                   np.zeros(shape, np.int32), np.zeros(shape, np.float32), np.zeros(num_rows, np.int64))

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]

    def rows(self, start: int, stop: int) -> PackedBatch:
        return PackedBatch(*(getattr(self, key)[start:stop] for key in BATCH_KEYS))

    def place(self, row: int, column: int, segment: int, doc: TokenizedDocument, offset: int, take: int) -> None:
        """Write pairs [offset, offset + take) of `doc` into `row` from `column`, as segment `segment`."""
        span = slice(column, column + take)
        self.inputs[row, span] = doc.tokens[offset:offset + take]
        self.targets[row, span] = doc.tokens[offset + 1:offset + take + 1]
        self.segment_ids[row, span] = segment
        self.positions[row, span] = np.arange(take, dtype=np.int32)
        self.loss_mask[row, span] = 1.0
        self.chars[row] += _chars_of_pairs(doc, offset, offset + take)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {key: getattr(self, key) for key in BATCH_KEYS}


def tokenized_document(ids: Sequence[int] | np.ndarray, chars: int, *, bos_id: int = BOS_ID,
                       eos_id: int = EOS_ID) -> TokenizedDocument:
    tokens = np.empty(len(ids) + 2, np.int32)  # [m]
    tokens[0], tokens[1:-1], tokens[-1] = bos_id, ids, eos_id
    return TokenizedDocument(tokens, int(chars))


def pack_rows(document_at: Callable[[int], TokenizedDocument | None], start: PackCursor, seq_len: int,
              num_rows: int, *, whole_documents: bool = False) -> tuple[PackedBatch, PackCursor]:
    """Fill `num_rows` rows from the document stream `document_at(i)` (None = the stream has ended) from `start`.

    Rows after the end of the stream stay padding. Returns the rows and the cursor to continue from.
    `whole_documents`: a document that fits in one row is never split over two; the row ends early (padding)
    instead. Costs padding, but keeps each short document's tokens visible to each other, which in-context tasks
    (a question whose answer is earlier in the same document) need: split, half their examples are unanswerable.
    """
    batch = PackedBatch.zeros(num_rows, seq_len)
    document, offset = start.document, start.offset
    for row in range(num_rows):
        column = segment = 0
        while column < seq_len and (doc := document_at(document)) is not None:
            if whole_documents and offset == 0 and column > 0 and seq_len - column < doc.num_pairs <= seq_len:
                break  # starts the next row whole
            take = min(doc.num_pairs - offset, seq_len - column)
            segment += 1
            batch.place(row, column, segment, doc, offset, take)
            column += take
            offset += take
            if offset == doc.num_pairs:
                document, offset = document + 1, 0
    return batch, PackCursor(document, offset)


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, *, doc_chars: Sequence[int] | None = None,
                   bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> PackedBatch:
    """Pack whole documents (ids without BOS/EOS) into ceil(total pairs / seq_len) rows.

    `doc_chars[i]` is the length of document i's text; without it `chars` is all zeros.
    """
    chars = doc_chars if doc_chars is not None else [0] * len(token_lists)
    if len(chars) != len(token_lists):
        raise ValueError(f"{len(chars)} character counts for {len(token_lists)} documents")
    docs = [tokenized_document(ids, n, bos_id=bos_id, eos_id=eos_id) for ids, n in zip(token_lists, chars, strict=True)]
    total_pairs = sum(doc.num_pairs for doc in docs)
    num_rows = -(-total_pairs // seq_len)
    batch, _ = pack_rows(lambda i: docs[i] if i < len(docs) else None, PackCursor(), seq_len, num_rows)
    return batch


def _chars_of_pairs(doc: TokenizedDocument, start: int, stop: int) -> int:
    """Characters owned by pairs [start, stop) of `doc` (integer shares that add up to doc.chars)."""
    return doc.chars * stop // doc.num_pairs - doc.chars * start // doc.num_pairs
