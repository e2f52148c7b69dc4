"""Sentencepiece BPE tokenizers trained at any vocabulary size, cached so a sweep trains each one once.

Id layout (every tokenizer here, including `ByteTokenizer`):
    0 pad, 1 unk, 2 bos, 3 eos, then the learned (or byte) pieces, then `num_reserved_ids` reserved ids at the
    END of the vocabulary ([sp_size, vocab_size)) that text never encodes to, e.g. for image codes.

The reserved ids are stored IN the saved sentencepiece model as trailing pieces of type UNUSED (`<reserved_i>`),
so `tokenizer.model` is self-contained: plain sentencepiece loads it at the full vocabulary size, and
sentencepiece's BPE never emits UNUSED pieces.

`encode` adds no BOS/EOS; packing (lm_core.data.packing) adds them per document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from lm_core.atomic_files import write_bytes_atomically
from lm_core.errors import UserError, brief

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL_IDS = 4
NUM_BYTE_PIECES = 256
MODEL_FILENAME = "tokenizer.model"
# Bump when the trainer options below change, so old cache entries are not reused for a different recipe.
_RECIPE_VERSION = 1
# Sentencepiece drops training sentences longer than max_sentence_length bytes; chunks of this many characters
# (<= 4 UTF-8 bytes each) always fit.
_MAX_SENTENCE_BYTES = 1 << 16
_MAX_SENTENCE_CHARS = _MAX_SENTENCE_BYTES // 4
# Training reads at most this many sentences (non-blank lines): a uniform sample of a bigger corpus, since
# sentencepiece holds its whole input in memory, several times over while it trains. A corpus with no more trains on
# every sentence in order, exactly as before the bound existed (same model, same cache entry).
MAX_TRAINING_SENTENCES = 2_000_000
_UNUSED = model_pb2.ModelProto.SentencePiece.UNUSED


class TextTokenizer(Protocol):
    """What the data pipeline and models need from a tokenizer (`Tokenizer` and `ByteTokenizer` both are)."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def reserved_range(self) -> range: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Everything that determines a trained tokenizer besides its corpus.

    The sentencepiece model gets vocab_size - num_reserved_ids pieces; the reserved ids are the top of the range.
    `seed` seeds sentencepiece's random generator and the sentence sample of a corpus bigger than
    MAX_TRAINING_SENTENCES; BPE training on a whole, unshuffled corpus uses no randomness, so there it mainly keeps
    cache entries of different seeds apart.
    """

    vocab_size: int
    seed: int = 0
    num_reserved_ids: int = 0
    user_defined_symbols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from configs but keep the dataclass hashable and the cache key canonical.
        object.__setattr__(self, "user_defined_symbols", tuple(self.user_defined_symbols))

    @property
    def sentencepiece_size(self) -> int:
        return self.vocab_size - self.num_reserved_ids

    @property
    def min_vocab_size(self) -> int:
        """Lower bound before looking at the corpus: specials, 256 byte pieces, user symbols, reserved ids and
        at least one learned piece. The corpus adds one piece per frequent character (see train_tokenizer)."""
        return NUM_SPECIAL_IDS + NUM_BYTE_PIECES + len(self.user_defined_symbols) + self.num_reserved_ids + 1


class Tokenizer:
    """A sentencepiece model plus the reserved id range at the end of the vocabulary."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self._sp.get_piece_size()
        self.num_reserved_ids = _count_trailing_unused(self._sp)
        if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (0, 1, 2, 3):
            raise UserError("tokenizer model has special ids (pad, unk, bos, eos) = "
                            f"{(self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())}; "
                            "valid: (0, 1, 2, 3) as written by lm_core.tokenizer.train_tokenizer")

    @property
    def reserved_range(self) -> range:
        return range(self.vocab_size - self.num_reserved_ids, self.vocab_size)

    @property
    def model_proto(self) -> bytes:
        """The serialized model (reserved pieces included): what `save` writes."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=min(8, os.cpu_count() or 1))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping pad and reserved ids (bos/eos are control pieces and decode to nothing)."""
        first_reserved = self.vocab_size - self.num_reserved_ids
        return self._sp.decode([int(i) for i in ids if int(i) != PAD_ID and 0 <= int(i) < first_reserved])

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`, or unk_id when the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, path: str | Path) -> None:
        write_bytes_atomically(Path(path), self._proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model '{path}' does not exist; valid: a {MODEL_FILENAME} written by "
                            "train_tokenizer or Tokenizer.save")
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise UserError(f"tokenizer model '{path}' is not a readable sentencepiece model ({brief(e)}); "
                            f"valid: a {MODEL_FILENAME} written by train_tokenizer or Tokenizer.save") from e

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, num_reserved_ids={self.num_reserved_ids})"


class ByteTokenizer:
    """UTF-8 bytes as ids 4..259 after pad/unk/bos/eos: no training, for tests and demos."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, num_reserved_ids: int = 0):
        if num_reserved_ids < 0:
            raise UserError(f"num_reserved_ids={num_reserved_ids} is negative; valid: >= 0")
        self.num_reserved_ids = num_reserved_ids
        self.vocab_size = NUM_SPECIAL_IDS + NUM_BYTE_PIECES + num_reserved_ids

    @property
    def reserved_range(self) -> range:
        return range(NUM_SPECIAL_IDS + NUM_BYTE_PIECES, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIAL_IDS).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - NUM_SPECIAL_IDS for i in ids if NUM_SPECIAL_IDS <= int(i) < self.reserved_range.start)
        return data.decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int:
        data = piece.encode("utf-8")
        return data[0] + NUM_SPECIAL_IDS if len(data) == 1 else UNK_ID

    @property
    def model_bytes(self) -> bytes:
        """What `save` writes: the whole tokenizer (its kind and reserved ids)."""
        return json.dumps({"kind": "byte", "num_reserved_ids": self.num_reserved_ids}).encode()

    def save(self, path: str | Path) -> None:
        write_bytes_atomically(Path(path), self.model_bytes)

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        try:
            config = json.loads(Path(path).read_text())
            if config.get("kind") != "byte":
                raise ValueError(f"kind={config.get('kind')!r}")
            return cls(int(config["num_reserved_ids"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"byte tokenizer file '{path}' is missing or corrupt ({brief(e)}); "
                            "valid: a file written by ByteTokenizer.save") from e

    def __repr__(self) -> str:
        return f"ByteTokenizer(num_reserved_ids={self.num_reserved_ids})"


def load_tokenizer(path: str | Path) -> Tokenizer | ByteTokenizer:
    """Load whatever `save` wrote: a ByteTokenizer's JSON or a sentencepiece model."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(1) == b"{":
                return ByteTokenizer.load(path)
    return Tokenizer.load(path)


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec, cache_dir: str | Path, *,
                    max_sentences: int = MAX_TRAINING_SENTENCES) -> Tokenizer:
    """Train (or reuse) a BPE tokenizer for `texts`; the result depends only on (texts, spec, max_sentences).

    `texts` is read once, as a stream, while hashing it: memory holds at most `max_sentences` sentences (a seeded
    uniform sample when the corpus has more), never the whole corpus. The cache entry is
    `cache_dir/<sha256(corpus, spec, recipe)>/tokenizer.model`, written under a temporary name and renamed, so
    concurrent sweeps never read a half-written model.
    """
    _check_spec(spec)
    if max_sentences <= 0:
        raise UserError(f"max_sentences={max_sentences} is invalid; valid: a positive number of sentences")
    corpus = _read_corpus(texts, max_sentences, spec.seed)
    sampled = max_sentences if corpus.num_sentences > max_sentences else 0
    model_path = Path(cache_dir) / cache_key(corpus.fingerprint, spec, sampled_sentences=sampled) / MODEL_FILENAME
    if model_path.is_file():
        log.info("reusing tokenizer %s", model_path)
        return Tokenizer.load(model_path)

    if not corpus.sentences:
        raise UserError("cannot train a tokenizer on an empty corpus (no non-blank lines); valid: texts with "
                        "at least one non-blank line")
    start = time.perf_counter()
    proto = _append_reserved_pieces(_train_sentencepiece(corpus.sentences, spec), spec.num_reserved_ids)
    tokenizer = Tokenizer(proto)
    write_bytes_atomically(model_path, proto)
    info = {"spec": dataclasses.asdict(spec), "corpus_sha256": corpus.fingerprint, "corpus_chars": corpus.chars,
            "corpus_sentences": corpus.num_sentences, "train_seconds": round(time.perf_counter() - start, 3)}
    if sampled:
        info["training_sentences"] = len(corpus.sentences)
    write_bytes_atomically(model_path.with_name("spec.json"), json.dumps(info, indent=2).encode())
    log.info("trained tokenizer %s in %.1fs", model_path, info["train_seconds"])
    return tokenizer


def cache_key(corpus_fingerprint: str, spec: TokenizerSpec, *, sampled_sentences: int = 0) -> str:
    """`sampled_sentences` > 0: the model was trained on a sample of that many sentences. It enters the key only
    then, so the keys of corpora trained on every sentence are the ones they had before sampling existed."""
    fields = {"corpus": corpus_fingerprint, "spec": dataclasses.asdict(spec), "recipe": _RECIPE_VERSION}
    if sampled_sentences:
        fields["sampled_sentences"] = sampled_sentences
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _check_spec(spec: TokenizerSpec) -> None:
    if spec.num_reserved_ids < 0:
        raise UserError(f"num_reserved_ids={spec.num_reserved_ids} is negative; valid: >= 0")
    if spec.vocab_size < spec.min_vocab_size:
        raise UserError(f"vocab_size={spec.vocab_size} is too small; valid: >= {spec.min_vocab_size} (4 specials + "
                        f"256 byte pieces + {len(spec.user_defined_symbols)} user symbols + "
                        f"{spec.num_reserved_ids} reserved ids + 1), plus one id per frequent character")
    symbols = spec.user_defined_symbols
    if not all(symbols) or len(set(symbols)) != len(symbols):
        raise UserError(f"user_defined_symbols={spec.user_defined_symbols!r} has empty or repeated entries; "
                        "valid: distinct non-empty strings")


@dataclasses.dataclass
class _Corpus:
    fingerprint: str  # sha256 of the whole texts, so the key ignores how we cut sentences
    chars: int
    num_sentences: int  # in the whole corpus
    sentences: list[str]  # all of them in order, or a uniform sample of max_sentences


def _read_corpus(texts: Iterable[str], max_sentences: int, seed: int) -> _Corpus:
    """One pass over `texts`: hash them and keep their sentences, by reservoir sampling (seeded by the spec's seed)
    once there are more than `max_sentences`; until then the kept list is every sentence in order.

    The sample is drawn here rather than by sentencepiece (input_sentence_size + shuffle_input_sentence): the cache
    key needs the whole corpus hashed before training, and `texts` may be a one-shot iterator (the trainer's), so
    the one pass that hashes must also keep what training reads."""
    digest = hashlib.sha256()
    rng = random.Random(seed)
    kept: list[str] = []
    chars = count = 0
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        chars += len(text)
        for sentence in _sentences(text):
            count += 1
            if len(kept) < max_sentences:
                kept.append(sentence)
            elif (slot := rng.randrange(count)) < max_sentences:
                kept[slot] = sentence  # each of the `count` sentences so far is kept with the same probability
    return _Corpus(digest.hexdigest(), chars, count, kept)


def _sentences(text: str) -> Iterator[str]:
    """Non-blank lines, long ones cut into chunks sentencepiece accepts (it silently skips longer ones)."""
    for line in text.split("\n"):
        if not line.strip():
            continue
        for start in range(0, len(line), _MAX_SENTENCE_CHARS):
            yield line[start:start + _MAX_SENTENCE_CHARS]


def _train_sentencepiece(sentences: list[str], spec: TokenizerSpec) -> bytes:
    model = io.BytesIO()
    spm.set_random_generator_seed(spec.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=spec.sentencepiece_size,
            hard_vocab_limit=True,  # exactly vocab_size pieces, or an error
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="nfkc",
            remove_extra_whitespaces=False,  # keep indentation and double spaces: decode(encode(x)) == nfkc(x)
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(spec.user_defined_symbols),
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=0,  # every sentence given: _read_corpus has already sampled a big corpus
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=2,  # fixed: the thread count is recorded in (and changes) the model bytes
            minloglevel=2,
        )
    except RuntimeError as e:
        size_error = _vocab_size_error(e, spec)
        if size_error is None:
            raise  # anything but a size complaint is a bug, keep the traceback
        raise size_error from e
    return model.getvalue()


def _vocab_size_error(error: RuntimeError, spec: TokenizerSpec) -> UserError | None:
    """Sentencepiece's vocabulary-size complaints as one-line UserErrors naming the valid bound."""
    message = str(error)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        minimum = int(too_small.group(2)) + spec.num_reserved_ids
        return UserError(f"vocab_size={spec.vocab_size} is too small for this corpus; valid: >= {minimum} "
                         "(specials, 256 byte pieces, one piece per frequent character, reserved ids)")
    too_large = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        maximum = int(too_large.group(2)) + spec.num_reserved_ids
        return UserError(f"vocab_size={spec.vocab_size} is too large for this corpus; valid: <= {maximum} "
                         "(or train on more text)")
    return None


def _append_reserved_pieces(proto: bytes, num_reserved_ids: int) -> bytes:
    model = model_pb2.ModelProto.FromString(proto)
    for i in range(num_reserved_ids):
        piece = model.pieces.add()
        piece.piece = f"<reserved_{i}>"
        piece.score = 0.0
        piece.type = _UNUSED
    return model.SerializeToString()


def _count_trailing_unused(sp: spm.SentencePieceProcessor) -> int:
    count = 0
    while count < sp.get_piece_size() and sp.is_unused(sp.get_piece_size() - 1 - count):
        count += 1
    return count
