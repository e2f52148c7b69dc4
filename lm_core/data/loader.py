"""The text loader: a deterministic, exactly resumable stream of packed next-token batches of documents.

The stream, its one-cursor resumable position and the multi-host split are `stream.PackedStream`'s. Here: the
items are the split's text documents, tokenized in chunks as the stream reaches them. Every host tokenizes every
document; each document is tokenized once per loader and kept in memory (fine for corpora of a few hundred MB of
text; bigger ones want a prepared dataset, `tokens:DIR`, read by lm_core.data.prepared without keeping it).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from lm_core.data.packing import TokenizedDocument, tokenized_document
from lm_core.data.stream import PackedStream
from lm_core.errors import UserError
from lm_core.tokenizer import TextTokenizer

# Documents hashed into a loader's content digest (its saved position is valid only for the same corpus).
CONTENT_SAMPLE = 64
# Documents tokenized per encode_batch call: big enough for sentencepiece's threads, small enough that the first
# batch arrives quickly.
_TOKENIZE_CHUNK = 256


class LMDataLoader(PackedStream):
    """Infinite (repeat=True) or single-pass stream of this host's rows of each global batch of text.

    `next()` returns {"inputs", "targets", "segment_ids", "positions", "loss_mask": [per_host, seq_len],
    "chars": [per_host]} as numpy arrays.
    """

    def __init__(self, source_split: Sequence[str], tokenizer: TextTokenizer, *, seq_len: int,
                 global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, repeat: bool = True, whole_documents: bool = False):
        if len(source_split) == 0:
            raise UserError("the data split has no documents; valid: a split with at least one document")
        super().__init__(len(source_split), seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count, shuffle=shuffle,
                         repeat=repeat, whole_documents=whole_documents)
        self._documents = source_split
        self._tokenizer = tokenizer
        self._cache: dict[int, TokenizedDocument] = {}  # document index -> tokens

    @property
    def num_documents(self) -> int:
        return self.num_items

    def _stream_identity(self) -> dict[str, int]:
        # offsets count tokens of this tokenizer; the digest tells another corpus of the same size apart
        return {"seed": self._seed, "num_documents": self.num_documents, "shuffle": int(self._shuffle),
                "vocab_size": self._tokenizer.vocab_size, "content_digest": self._content_digest}

    @functools.cached_property
    def _content_digest(self) -> int:
        return content_digest(self._documents, self._tokenizer)

    def _document_at(self, stream_index: int) -> TokenizedDocument | None:
        located = self._epoch_and_item(stream_index)
        if located is None:
            return None
        index = located[1]
        if index not in self._cache:
            self._tokenize_ahead(stream_index)
        return self._cache[index]

    def _tokenize_ahead(self, stream_index: int) -> None:
        """Tokenize the next chunk of not-yet-seen documents of the stream in one (multi-threaded) call."""
        indices = self._unseen_items_ahead(stream_index, _TOKENIZE_CHUNK, self._cache)
        texts = [self._documents[i] for i in indices]
        for index, text, ids in zip(indices, texts, self._tokenizer.encode_batch(texts), strict=True):
            self._cache[index] = tokenized_document(ids, len(text), bos_id=self._tokenizer.bos_id,
                                                    eos_id=self._tokenizer.eos_id)


def content_digest(documents: Sequence[str], tokenizer: TextTokenizer) -> int:
    """A 48-bit digest of up to CONTENT_SAMPLE evenly spaced documents and of how the tokenizer encodes them:
    cheap at any corpus size (random access), and different for a different corpus or tokenizer. A prepared
    dataset (lm_core.data.prepared) records its splits' digests, so its loader's saved position equals this one's."""
    step = max(1, len(documents) // CONTENT_SAMPLE)
    digest = hashlib.sha256()
    for index in range(0, len(documents), step)[:CONTENT_SAMPLE]:
        text = documents[index]
        digest.update(f"{index}:{len(text)}:".encode())
        digest.update(text.encode("utf-8", errors="surrogatepass"))
    probe = documents[0][:256]
    digest.update(np.asarray(tokenizer.encode(probe), np.int64).tobytes())
    return int.from_bytes(digest.digest()[:6], "big")


def iter_eval_batches(split: Sequence[str], tokenizer: TextTokenizer, seq_len: int, batch_size: int,
                      max_batches: int | None = None, *, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split` in order (no shuffle); the last batch is padded with loss_mask 0.

    `batch_size` is global: with several processes each gets its rows of every batch, as in training.
    """
    loader = LMDataLoader(split, tokenizer, seq_len=seq_len, global_batch_size=batch_size, seed=0,
                          process_index=process_index, process_count=process_count, shuffle=False, repeat=False)
    yield from itertools.islice(loader, max_batches)

