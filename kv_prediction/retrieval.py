"""A prompt-dependent accuracy task: synthetic fact-recall documents mixed into a text corpus.

A retrieval document states a few facts "The <category> <value>." (the pet, the colour, the city, ...; the value
drawn from that category's list) between stretches of filler text taken from the corpus, then recalls every fact,
in a shuffled order:

    The pet horse. <filler> The city Oslo. <filler>
    Recall: The city Oslo.
    Recall: The pet horse.

A value appears only in its document, so a model recalls it only by reading the prompt: exactly what a predicted
KV cache must preserve. An evaluation prompt ends just before the value of the document's last recall ("...
Recall: The pet"; the earlier recalls are in-context demonstrations, like the paper's 1-shot TriviaQA prompt);
the model's greedy continuation is scored by exact match (`extract_answer`); guessing scores about 1/10.

Why this form: the value follows its category word directly, so recalling it is the simplest in-context lookup
(find the earlier occurrence of the current word, copy what came next). Train with `data.whole_documents=True`:
a retrieval document split over two packed rows loses its facts, and in our runs the tiny base stayed at chance
with greedy packing, while whole documents took it to 41% exact match after 400 steps and 100% after 800.

`retrieval:<source>` (registered with `lm_core.data` when this module is imported) is `<source>` with retrieval
documents added to both splits, e.g. `retrieval:builtin`, `retrieval:share=0.3,facts=2:files:corpus/*.txt`.
Every document is a pure function of (options, split, index), so training data and evaluation prompts are
reproducible; a split's filler comes from the same split of the corpus, so evaluation prompts are held out.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import overload

import numpy as np

from lm_core.data.sources import TextSource, get_text_source, register_text_source
from lm_core.errors import UserError

PREFIX = "retrieval"
ANSWER_CUE = "Recall:"
SPLIT_SEEDS = {"train": 0, "validation": 1}
# Simple, distinct nouns of a few tokens each: the lookup is about matching a word, not spelling a rare one.
# category -> the values it takes (common words, mostly one token each)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "pet": ("cat", "dog", "horse", "mouse", "bird", "fish", "rabbit", "goat", "sheep", "duck"),
    "colour": ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"),
    "city": ("Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon"),
    "fruit": ("apple", "pear", "plum", "cherry", "lemon", "mango", "peach", "grape", "melon", "banana"),
    "metal": ("iron", "gold", "silver", "copper", "tin", "lead", "zinc", "nickel", "steel", "bronze"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "tool": ("hammer", "saw", "drill", "knife", "spoon", "brush", "rope", "ladder", "shovel", "needle"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
}
ATTRIBUTES = tuple(CATEGORIES)
FILLER_POOL = 4096
_OPTION = re.compile(r"(\w+)=([^,:]+)")


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """How retrieval documents look and how many are mixed in."""

    share: float = 0.5  # fraction of the mixed split's characters that are retrieval documents
    facts: int = 3  # facts (and questions) per document
    filler_chars: int = 120  # at most this many characters of corpus text after each fact
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise UserError(f"retrieval share={self.share} is invalid; valid: a fraction in (0, 1)")
        if not 1 <= self.facts <= len(ATTRIBUTES):
            raise UserError(f"retrieval facts={self.facts} is invalid; valid: 1 to {len(ATTRIBUTES)}")
        if self.filler_chars < 0:
            raise UserError(f"retrieval filler_chars={self.filler_chars} is invalid; valid: >= 0")

    def spec(self, source: str) -> str:
        """The text-source spec mixing these documents into `source`."""
        return (f"{PREFIX}:share={self.share},facts={self.facts},filler_chars={self.filler_chars},"
                f"seed={self.seed}:{source}")


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    prompt: str  # the document up to its last recall's value: "... Recall: The pet"
    answer: str  # the value asked for, e.g. "horse"


def parse_spec(argument: str) -> tuple[RetrievalOptions, str]:
    """(options, inner source spec) from the argument of `retrieval:[k=v,...:]<source>`."""
    options: dict[str, str] = {}
    head, sep, rest = argument.partition(":")
    if sep and all(_OPTION.fullmatch(part) for part in head.split(",")):
        options = dict(part.split("=", 1) for part in head.split(","))
        argument = rest
    fields = {f.name: f.type for f in dataclasses.fields(RetrievalOptions)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UserError(f"retrieval source option(s) {unknown} unknown; valid: {', '.join(fields)}")
    try:
        values = {name: (float(v) if fields[name] == "float" else int(v)) for name, v in options.items()}
    except ValueError as error:
        raise UserError(f"retrieval source options {head!r}: {error}") from None
    if not argument:
        raise UserError("text source 'retrieval:' names no corpus; valid: retrieval:[<options>:]<source>, e.g. "
                        "retrieval:builtin")
    return RetrievalOptions(**values), argument


def _filler(rng: np.random.Generator, corpus: Sequence[str], chars: int) -> str:
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


def retrieval_document(options: RetrievalOptions, split: str, index: int, corpus: Sequence[str]) -> str:
    """Document `index` of `split`: facts with filler, then a recall of each fact (shuffled)."""
    rng = np.random.default_rng([options.seed, SPLIT_SEEDS[split], index])
    attributes = [ATTRIBUTES[i] for i in rng.choice(len(ATTRIBUTES), options.facts, replace=False)]
    values = [CATEGORIES[a][int(rng.integers(len(CATEGORIES[a])))] for a in attributes]
    parts = []
    for attribute, value in zip(attributes, values, strict=True):
        parts.append(f"The {attribute} {value}.")
        # Filler of random length: near and far facts in every batch, so the lookup is learned at short range
        # first and then holds at long range.
        if filler := _filler(rng, corpus, int(rng.integers(options.filler_chars + 1))):
            parts.append(filler)
    lines = [" ".join(parts)]
    lines += [f"{ANSWER_CUE} The {attributes[k]} {values[k]}." for k in rng.permutation(options.facts)]
    return "\n".join(lines) + "\n"


def as_example(document: str) -> RetrievalExample:
    """The evaluation example of a document: everything before its last recall's value, and that value."""
    last_answer = document.rindex(ANSWER_CUE)
    attribute = next(a for a in ATTRIBUTES if document.startswith(f"{ANSWER_CUE} The {a} ", last_answer))
    cut = last_answer + len(f"{ANSWER_CUE} The {attribute}")
    return RetrievalExample(document[:cut], document[cut:].split("\n")[0].strip().rstrip("."))


def retrieval_examples(options: RetrievalOptions, corpus_validation: Sequence[str], count: int
                       ) -> list[RetrievalExample]:
    """The first `count` held-out examples (validation documents: validation filler, validation seed)."""
    filler = OneLineTexts(corpus_validation)
    return [as_example(retrieval_document(options, "validation", i, filler)) for i in range(count)]


def extract_answer(generated: str) -> str:
    """The answer in a greedy continuation: up to the first newline, period or comma (as the paper scores
    TriviaQA), stripped."""
    return re.split(r"[\n.,]", generated, maxsplit=1)[0].strip()


def exact_match(generated: str, answer: str) -> bool:
    return extract_answer(generated) == answer


class OneLineTexts(Sequence[str]):
    """The first FILLER_POOL documents of a corpus split, read once into memory with their whitespace collapsed:
    cheap filler for any number of retrieval documents, even over a corpus too big for memory."""

    def __init__(self, corpus: Sequence[str]):
        self._texts = [" ".join(corpus[i].split()) for i in range(min(len(corpus), FILLER_POOL))]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index):  # type: ignore[override]
        return self._texts[index]


class MixedTexts(Sequence[str]):
    """The corpus documents, then `count` retrieval documents generated on access (the loader shuffles)."""

    def __init__(self, corpus: Sequence[str], options: RetrievalOptions, split: str, count: int):
        self._corpus = corpus
        self._filler = OneLineTexts(corpus)
        self._options = options
        self._split = split
        self._count = count

    def __len__(self) -> int:
        return len(self._corpus) + self._count

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self._corpus):
            return self._corpus[index]
        return retrieval_document(self._options, self._split, index - len(self._corpus), self._filler)


def retrieval_count(options: RetrievalOptions, corpus: Sequence[str], split: str) -> int:
    """How many retrieval documents make them `options.share` of the split's characters (at least one)."""
    filler = OneLineTexts(corpus)
    # Characters of the split, estimated from the filler pool (exact for corpora of up to FILLER_POOL documents).
    corpus_chars = sum(len(corpus[i]) for i in range(len(filler))) * len(corpus) / max(len(filler), 1)
    sample = [len(retrieval_document(options, split, i, filler)) for i in range(64)]
    retrieval_chars = options.share / (1 - options.share) * corpus_chars
    return max(1, round(retrieval_chars / float(np.mean(sample))))


def mixed_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    options, inner = parse_spec(argument)
    source = get_text_source(inner, data_dir=data_dir)
    splits = {}
    for split in ("train", "validation"):
        corpus = source.split(split)
        splits[split] = MixedTexts(corpus, options, split, retrieval_count(options, corpus, split))
    return TextSource(f"{PREFIX}:{argument}", splits)


register_text_source(PREFIX, mixed_source, form="retrieval:[<k=v,...>:]<text source>", overwrite=True)
