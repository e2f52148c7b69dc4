"""Mixed-modal token sequences for early fusion: one vocabulary, image-caption documents, packing, a loader.

Vocabulary layout (`MixedVocab`), built on lm_core's reserved ids at the END of a text tokenizer's vocabulary:

    [0, text_vocab_size)                      text tokenizer ids (pad 0, unk 1, BOS 2, EOS 3, pieces)
    [image_offset, image_offset + K)          the K image codes of the VQ tokenizer (image_offset = text_vocab_size)
    boi_id = image_offset + K, eoi_id = +1    begin / end of image
    [eoi_id + 1, vocab_size)                  any further reserved ids, unused

BOI/EOI come AFTER the codes so that the image range is exactly the VQ codebook (code k <-> id image_offset + k)
and `MoMaConfig.image_token_range` = `vocab.image_token_range`. BOI and EOI count as TEXT for routing and for the
per-modality loss: the text side decides when an image starts, and once the image ends, what follows is text.
A tokenizer for this layout: `TokenizerSpec(vocab_size=..., num_reserved_ids=reserved_ids_for_images(K))`.

Documents (ids, BOS/EOS added by lm_core's packing):
    text first (generation):  BOS caption BOI codes EOI EOS
    image first (captioning): BOS BOI codes EOI caption EOS
Which one a pair gets is decided by a hash of (seed, pair index, epoch): about half of each, independent of where
the pair lands in the shuffled stream, and a pair seen in several epochs is seen both ways.

Packing and positions are lm_core's (`pack_rows`): segment ids, positions restarting per document, loss mask,
`chars` (caption characters). Batches carry nothing else: the per-modality losses find each target's modality
from its id on the device (`moma.losses`, `per_modality_sums`), so per-row modality counts would be sent to the
device every step for nothing; `modality_counts` computes them on the host for whoever inspects a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lm_core.atomic_files import write_bytes_atomically
from lm_core.data.packing import TokenizedDocument, tokenized_document
from lm_core.data.stream import PackedStream
from lm_core.errors import UserError
from lm_core.tokenizer import TextTokenizer
from moma.variants import image_token_mask
from moma.vq.codec import encode_images
from moma.vq.model import VQTokenizer

# Captions tokenized per encode_batch call (as lm_core's loader does): threads for sentencepiece, quick first batch.
_TOKENIZE_CHUNK = 256


def reserved_ids_for_images(codebook_size: int) -> int:
    """Reserved ids a text tokenizer needs for K image codes + BOI + EOI."""
    return codebook_size + 2


@dataclasses.dataclass(frozen=True)
class MixedVocab:
    """Where text, image codes and BOI/EOI live in the one vocabulary (see the module docstring)."""

    text_vocab_size: int
    codebook_size: int
    vocab_size: int = 0  # 0 = exactly text + codes + BOI/EOI; larger when the tokenizer reserved more ids

    def __post_init__(self) -> None:
        if self.text_vocab_size < 1 or self.codebook_size < 1:
            raise UserError(f"text_vocab_size={self.text_vocab_size} and codebook_size={self.codebook_size} must "
                            "be positive")
        needed = self.text_vocab_size + reserved_ids_for_images(self.codebook_size)
        if self.vocab_size == 0:
            object.__setattr__(self, "vocab_size", needed)
        elif self.vocab_size < needed:
            raise UserError(f"vocab_size={self.vocab_size} is too small for {self.text_vocab_size} text ids, "
                            f"{self.codebook_size} image codes, BOI and EOI; valid: >= {needed}")

    @classmethod
    def for_tokenizer(cls, tokenizer: TextTokenizer, codebook_size: int) -> MixedVocab:
        """Image codes + BOI/EOI in the first ids of the tokenizer's reserved range (its vocab_size is kept)."""
        reserved = tokenizer.reserved_range
        if len(reserved) < reserved_ids_for_images(codebook_size):
            raise UserError(f"the text tokenizer reserves {len(reserved)} ids, too few for codebook_size="
                            f"{codebook_size}; valid: num_reserved_ids >= {reserved_ids_for_images(codebook_size)} "
                            "(K image codes + BOI + EOI), e.g. TokenizerSpec(num_reserved_ids="
                            f"{reserved_ids_for_images(codebook_size)})")
        return cls(reserved.start, codebook_size, tokenizer.vocab_size)

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def eoi_id(self) -> int:
        return self.boi_id + 1

    @property
    def image_token_range(self) -> tuple[int, int]:
        """[lo, hi): the ids that are image codes (what moma's MoMaConfig.image_token_range wants)."""
        return self.image_offset, self.image_offset + self.codebook_size

    def is_image_token(self, ids: Any) -> Any:
        """Boolean mask of image-code ids; numpy or jax arrays alike (`moma.variants.image_token_mask`)."""
        return image_token_mask(ids, self.image_token_range)

    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        """VQ codes [...] in [0, K) -> vocabulary ids [...]."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise UserError(f"image codes span [{codes.min()}, {codes.max()}]; valid: [0, {self.codebook_size})")
        return (codes + self.image_offset).astype(np.int32)

    def codes_of(self, ids: np.ndarray) -> np.ndarray:
        """Vocabulary ids of image tokens -> VQ codes (ids outside the image range are an error)."""
        ids = np.asarray(ids)
        if not np.all(self.is_image_token(ids)):
            raise UserError(f"ids {ids[~self.is_image_token(ids)][:5].tolist()} are not image codes; valid: "
                            f"ids in [{self.image_token_range[0]}, {self.image_token_range[1]})")
        return (ids - self.image_offset).astype(np.int32)


def per_modality_sums(token_losses: Any, targets: Any, loss_mask: Any, vocab: MixedVocab) -> dict[str, Any]:
    """Summed losses and target counts per modality (by the TARGET's modality), for per-modality mean losses.

    token_losses, targets, loss_mask: [batch, seq]; numpy or jax arrays. A trainer logs
    text_loss = text_loss_sum / text_tokens and image_loss = image_loss_sum / image_tokens.
    """
    is_image = vocab.is_image_token(targets)
    image, text = is_image * loss_mask, (1 - is_image) * loss_mask
    return {"text_loss_sum": (token_losses * text).sum(), "image_loss_sum": (token_losses * image).sum(),
            "text_tokens": text.sum(), "image_tokens": image.sum()}


def image_first(seed: int, index: int, epoch: int = 0) -> bool:
    """Whether pair `index` is laid out image-first (captioning) in `epoch`: one bit of a hash, ~50% each way."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def mixed_document(caption_ids: Sequence[int], codes: np.ndarray, vocab: MixedVocab, *,
                   image_first: bool) -> np.ndarray:
    """Ids of one pair without BOS/EOS: `caption BOI codes EOI` or `BOI codes EOI caption`. codes: [h, w] or
    [h*w] raster order. -> [len(caption) + h*w + 2] int32."""
    image = np.concatenate([[vocab.boi_id], vocab.image_ids(np.asarray(codes).reshape(-1)), [vocab.eoi_id]])
    caption = np.asarray(caption_ids, np.int32).reshape(-1)
    if caption.size and (caption.min() < 0 or caption.max() >= vocab.text_vocab_size):
        raise UserError(f"caption ids span [{caption.min()}, {caption.max()}]; valid: text ids [0, "
                        f"{vocab.text_vocab_size})")
    parts = (image, caption) if image_first else (caption, image)
    return np.concatenate(parts).astype(np.int32)


def modality_counts(targets: np.ndarray, loss_mask: np.ndarray, vocab: MixedVocab) -> dict[str, np.ndarray]:
    """Per row: loss-bearing targets that are text / image codes. [rows, seq] -> [rows] int32 each.

    Host-side only, for inspecting batches: the loader does not add these to its batches, since the training and
    evaluation losses count each modality's targets themselves (`per_modality_sums`)."""
    is_image, counted = vocab.is_image_token(targets), loss_mask > 0
    image, text = is_image & counted, ~is_image & counted
    return {"text_tokens": text.sum(-1).astype(np.int32), "image_tokens": image.sum(-1).astype(np.int32)}


# ---------------------------------------------------------------------------------------------------------------
# Image-caption pairs as codes


@dataclasses.dataclass(frozen=True)
class CodedPairs:
    """Captions with their images already quantised: what the mixed-modal loader reads (no VQ in the loop)."""

    captions: Sequence[str]  # [N]
    codes: np.ndarray  # [N, h, w] int32 in [0, codebook_size)
    codebook_size: int

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim != 3 or len(codes) != len(self.captions):
            raise UserError(f"codes of shape {codes.shape} do not match {len(self.captions)} captions; valid: "
                            "[num_captions, h, w]")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise UserError(f"image codes span [{codes.min()}, {codes.max()}]; valid: [0, {self.codebook_size})")
        object.__setattr__(self, "codes", codes.astype(np.int32))

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def tokens_per_image(self) -> int:
        return int(np.prod(self.codes.shape[1:]))

    def save(self, path: str | os.PathLike) -> None:
        """One .npz (codes, captions as JSON), written atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, codes=self.codes, captions=np.asarray(json.dumps(list(self.captions))),
                 codebook_size=np.asarray(self.codebook_size))
        write_bytes_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodedPairs:
        try:
            with np.load(path) as data:
                return cls(json.loads(str(data["captions"])), data["codes"], int(data["codebook_size"]))
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"coded pairs '{path}' are missing or corrupt ({' '.join(str(e).split())[:160]}); "
                            "valid: a file written by CodedPairs.save") from e


def encode_pairs(model: VQTokenizer, items: Sequence[Any], batch_size: int = 64) -> CodedPairs:
    """Quantise an image-caption split (ImageCaption-like items) once with a VQ tokenizer, for this module's
    loader."""
    codes, captions = [], []
    for start in range(0, len(items), batch_size):
        chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        codes.append(encode_images(model, np.stack([item.image for item in chunk]), batch_size))
        captions += [item.caption for item in chunk]
    grid = model.config.grid_size
    stacked = np.concatenate(codes) if codes else np.zeros((0, grid, grid), np.int32)
    return CodedPairs(captions, stacked, model.config.codebook_size)


# ---------------------------------------------------------------------------------------------------------------
# Loader


class MixedModalLoader(PackedStream):
    """Deterministic, exactly resumable stream of packed mixed-modal batches (lm_core's `PackedStream`).

    The items are image-caption pairs: stream document k is pair `perm_{k // n}[k % n]` in the layout
    `image_first(seed, pair, epoch)`, so the same pair alternates between image-first and caption-first.

    `next()` -> {"inputs", "targets", "segment_ids", "positions", "loss_mask": [per_host, seq_len],
    "chars": [per_host]} numpy arrays (`lm_core.data.packing.BATCH_KEYS`).
    """

    _description = "mixed-modal loader"
    _resume_with = "the same pairs, tokenizer, codebook, seed and shuffle"

    def __init__(self, pairs: CodedPairs, tokenizer: TextTokenizer, vocab: MixedVocab, *, seq_len: int,
                 global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, repeat: bool = True):
        if len(pairs) == 0:
            raise UserError("the image-caption pairs are empty; valid: at least one pair")
        super().__init__(len(pairs), seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count, shuffle=shuffle,
                         repeat=repeat)
        if pairs.codebook_size != vocab.codebook_size:
            raise UserError(f"pairs were coded with codebook_size={pairs.codebook_size} but the vocabulary has "
                            f"{vocab.codebook_size} image codes; valid: the same VQ tokenizer for both")
        if tokenizer.vocab_size != vocab.vocab_size or tokenizer.reserved_range.start != vocab.text_vocab_size:
            raise UserError(f"tokenizer (vocab_size={tokenizer.vocab_size}, reserved from "
                            f"{tokenizer.reserved_range.start}) does not match {vocab}; valid: "
                            "MixedVocab.for_tokenizer(tokenizer, codebook_size)")
        self._pairs = pairs
        self._tokenizer = tokenizer
        self.vocab = vocab
        self._caption_ids: dict[int, np.ndarray] = {}  # pair index -> caption token ids
        self._documents: dict[int, TokenizedDocument] = {}  # stream index -> document, for the batch being packed

    @property
    def num_pairs(self) -> int:
        return self.num_items

    def __next__(self) -> dict[str, np.ndarray]:
        rows = super().__next__()
        self._documents = {k: v for k, v in self._documents.items() if k >= self._cursor.document}
        return rows

    next = __next__

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self._documents = {}

    def _stream_identity(self) -> dict[str, int]:
        return {"seed": self._seed, "num_documents": self.num_pairs, "shuffle": int(self._shuffle),
                "vocab_size": self.vocab.vocab_size, "codebook_size": self.vocab.codebook_size,
                "tokens_per_image": self._pairs.tokens_per_image}

    def _document_at(self, stream_index: int) -> TokenizedDocument | None:
        if stream_index not in self._documents:
            located = self._epoch_and_item(stream_index)
            if located is None:
                return None
            epoch, index = located
            if index not in self._caption_ids:
                self._tokenize_ahead(stream_index)
            ids = mixed_document(self._caption_ids[index], self._pairs.codes[index], self.vocab,
                                 image_first=image_first(self._seed, index, epoch))
            self._documents[stream_index] = tokenized_document(ids, len(self._pairs.captions[index]),
                                                               bos_id=self._tokenizer.bos_id,
                                                               eos_id=self._tokenizer.eos_id)
        return self._documents[stream_index]

    def _tokenize_ahead(self, stream_index: int) -> None:
        """Tokenize the captions of the next chunk of not-yet-seen pairs of the stream in one call."""
        indices = self._unseen_items_ahead(stream_index, _TOKENIZE_CHUNK, self._caption_ids)
        captions = [self._pairs.captions[i] for i in indices]
        for index, ids in zip(indices, self._tokenizer.encode_batch(captions), strict=True):
            self._caption_ids[index] = np.asarray(ids, np.int32)


def iter_mixed_eval_batches(pairs: CodedPairs, tokenizer: TextTokenizer, vocab: MixedVocab, seq_len: int,
                            batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `pairs` in order (no shuffle); the last batch is padded with loss_mask 0."""
    loader = MixedModalLoader(pairs, tokenizer, vocab, seq_len=seq_len, global_batch_size=batch_size, seed=0,
                              shuffle=False, repeat=False)
    yield from itertools.islice(loader, max_batches)


__all__ = ["CodedPairs", "MixedModalLoader", "MixedVocab", "image_first", "iter_mixed_eval_batches",
           "mixed_document", "modality_counts", "per_modality_sums", "reserved_ids_for_images"]
