"""What the synthetic evaluation tasks share: corpus filler, a corpus with generated documents appended, spec
options, and exact-match scoring.

`kv_prediction.retrieval` (open book: the answer is in the prompt) and `kv_prediction.knowledge` (closed book:
the answer is in the weights) each generate documents as a pure function of (options, split, index) and mix them
into a text source's splits with `MixedTexts`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lm_core.data.views import IndexedView
from lm_core.errors import UserError

SPLIT_SEEDS = {"train": 0, "validation": 1}
FILLER_POOL = 4096
_OPTION = re.compile(r"(\w+)=([^,:]+)")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # what the model reads, ending where the answer starts
    answer: str  # the expected words, e.g. "horse"


def extract_answer(generated: str) -> str:
    """The answer in a greedy continuation: up to the first newline, period or comma (as the paper scores
    TriviaQA), stripped."""
    return re.split(r"[\n.,]", generated, maxsplit=1)[0].strip()


def exact_match(generated: str, answer: str) -> bool:
    return extract_answer(generated) == answer


def check_share(prefix: str, share: float) -> None:
    if not 0 < share < 1:
        raise UserError(f"{prefix} share={share} is invalid; valid: a fraction in (0, 1)")


def parse_options(prefix: str, argument: str, options_class: type) -> tuple[dict[str, Any], str]:
    """({field: value}, inner source spec) from `[k=v,...:]<source>`, typed by `options_class`'s fields."""
    options: dict[str, str] = {}
    head, sep, rest = argument.partition(":")
    if sep and all(_OPTION.fullmatch(part) for part in head.split(",")):
        options = dict(part.split("=", 1) for part in head.split(","))
        argument = rest
    fields = {f.name: f.type for f in dataclasses.fields(options_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UserError(f"{prefix} source option(s) {unknown} unknown; valid: {', '.join(fields)}")
    try:
        values = {name: (float(v) if fields[name] == "float" else int(v)) for name, v in options.items()}
    except ValueError as error:
        raise UserError(f"{prefix} source options {head!r}: {error}") from None
    if not argument:
        raise UserError(f"text source '{prefix}:' names no corpus; valid: {prefix}:[<options>:]<source>, e.g. "
                        f"{prefix}:builtin")
    return values, argument


def filler(rng: np.random.Generator, corpus: Sequence[str], chars: int) -> str:
    """About `chars` characters of one corpus document on one line, cut at word boundaries."""
    if chars == 0 or len(corpus) == 0:
        return ""
    text = corpus[int(rng.integers(len(corpus)))]
    text = text if isinstance(corpus, OneLineTexts) else " ".join(text.split())
    if len(text) <= chars:
        return text
    start = int(rng.integers(len(text) - chars))
    piece = text[start:start + chars]
    first_space = piece.find(" ")
    return piece[first_space + 1:piece.rfind(" ")] if 0 <= first_space < piece.rfind(" ") else piece


class OneLineTexts(Sequence[str]):
    """The first FILLER_POOL documents of a corpus split, read once into memory with their whitespace collapsed:
    cheap filler for any number of generated documents, even over a corpus too big for memory."""

    def __init__(self, corpus: Sequence[str]):
        while isinstance(corpus, MixedTexts):  # filler is corpus text, never another task's documents
            corpus = corpus.corpus
        self._texts = [" ".join(corpus[i].split()) for i in range(min(len(corpus), FILLER_POOL))]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index):  # type: ignore[override]
        return self._texts[index]


# (index, filler) -> the generated document `index`
DocumentFn = Callable[[int, OneLineTexts], str]


class MixedTexts(IndexedView[str]):
    """The corpus documents, then `count` generated documents made on access (the loader shuffles)."""

    def __init__(self, corpus: Sequence[str], document: DocumentFn, count: int):
        super().__init__(range(len(corpus) + count))
        self.corpus = corpus
        self._filler = OneLineTexts(corpus)
        self._document = document

    def _item(self, index: int) -> str:
        if index < len(self.corpus):
            return self.corpus[index]
        return self._document(index - len(self.corpus), self._filler)


def mixed_splits(source: Any, share: float, document_of: Callable[[str], DocumentFn]) -> dict[str, MixedTexts]:
    """Both splits of a text source with `share` of their characters in generated documents; `document_of(split)`
    gives that split's document function (each split draws its own documents and filler)."""
    splits = {}
    for split in SPLIT_SEEDS:
        corpus, document = source.split(split), document_of(split)
        splits[split] = MixedTexts(corpus, document, added_count(share, corpus, document))
    return splits


def added_count(share: float, corpus: Sequence[str], document: DocumentFn) -> int:
    """How many generated documents make them `share` of the split's characters (at least one)."""
    pool = OneLineTexts(corpus)
    # Characters of the split, estimated from evenly spaced documents (exact for up to FILLER_POOL documents).
    picked = np.unique(np.linspace(0, len(corpus) - 1, min(len(corpus), FILLER_POOL)).astype(int))
    corpus_chars = sum(len(corpus[int(i)]) for i in picked) * len(corpus) / max(len(picked), 1)
    sample = [len(document(i, pool)) for i in range(64)]
    return max(1, round(share / (1 - share) * corpus_chars / float(np.mean(sample))))
