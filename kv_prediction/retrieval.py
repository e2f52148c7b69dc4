"""An open-book recall task: facts about people stated in the prompt, one of them asked for at the end.

A retrieval document names one category, then states `facts` facts of it about different people ("Rosa
horse."; the values drawn from that category's list), between stretches of filler text taken from the corpus,
then recalls every fact in a shuffled order:

    Each person's pet. Rosa horse. <filler> Bob cat. <filler>
    Recall: Bob cat.
    Recall: Rosa horse.

A value appears only in its document, so a model recalls it only by reading the prompt: exactly what a predicted
KV cache must preserve. Every fact has the same category, so knowing which values the prompt holds is not enough:
the answer is the value stated right after the asked person, which only a cache that knows each token's
neighbours can tell (a context-free cache, e.g. the linear image of token embeddings, scores about 1/`facts`).
The value follows the name directly so that the lookup is the simplest in-context one (find the earlier
occurrence of the current word, copy what came next), which a small model learns in a few hundred steps. An
evaluation prompt ends just before the value of the document's first recall ("... Recall: Bob"), so no earlier
recall gives an answer away by elimination; the greedy continuation is scored by exact match
(`synthetic.exact_match`).

Train with `data.whole_documents=True`: a retrieval document split over two packed rows loses its facts.

`retrieval:<source>` (registered with `lm_core.data` when this module is imported) is `<source>` with retrieval
documents added to both splits, e.g. `retrieval:builtin`, `retrieval:share=0.3,facts=3:files:corpus/*.txt`.
Every document is a pure function of (options, split, index), so training data and evaluation prompts are
reproducible; a split's filler comes from the same split of the corpus, so evaluation prompts are held out.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from kv_prediction import synthetic
from kv_prediction.synthetic import Example, OneLineTexts
from lm_core.data.sources import TextSource, get_text_source, register_text_source
from lm_core.errors import UserError

PREFIX = "retrieval"
ANSWER_CUE = "Recall:"
# category -> the values it takes (common words, mostly one token each): the lookup is about binding a value to
# a person, not spelling a rare word.
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
PEOPLE = ("Anna", "Bob", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivan", "Jane", "Kurt", "Lena", "Max", "Nina",
          "Otto", "Paul", "Rosa", "Sam", "Tina", "Vera")
MAX_FACTS = min(len(values) for values in CATEGORIES.values())


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """How retrieval documents look and how many are mixed in."""

    share: float = 0.5  # fraction of the mixed split's characters that are retrieval documents
    facts: int = 2  # facts (about different people, one category) per document
    filler_chars: int = 120  # at most this many characters of corpus text after each fact
    seed: int = 0

    def __post_init__(self) -> None:
        synthetic.check_share(PREFIX, self.share)
        if not 1 <= self.facts <= MAX_FACTS:
            raise UserError(f"retrieval facts={self.facts} is invalid; valid: 1 to {MAX_FACTS}")
        if self.filler_chars < 0:
            raise UserError(f"retrieval filler_chars={self.filler_chars} is invalid; valid: >= 0")

    def spec(self, source: str) -> str:
        """The text-source spec mixing these documents into `source`."""
        return (f"{PREFIX}:share={self.share},facts={self.facts},filler_chars={self.filler_chars},"
                f"seed={self.seed}:{source}")



def parse_spec(argument: str) -> tuple[RetrievalOptions, str]:
    """(options, inner source spec) from the argument of `retrieval:[k=v,...:]<source>`."""
    values, inner = synthetic.parse_options(PREFIX, argument, RetrievalOptions)
    return RetrievalOptions(**values), inner


def fact(person: str, value: str) -> str:
    return f"{person} {value}."


def retrieval_document(options: RetrievalOptions, split: str, index: int, corpus: Sequence[str]) -> str:
    """Document `index` of `split`: facts of one category about different people with filler, then a recall of
    each fact (shuffled)."""
    rng = np.random.default_rng([options.seed, synthetic.SPLIT_SEEDS[split], index])
    category = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    people = [PEOPLE[i] for i in rng.choice(len(PEOPLE), options.facts, replace=False)]
    values = [CATEGORIES[category][i] for i in rng.choice(len(CATEGORIES[category]), options.facts, replace=False)]
    parts = [f"Each person's {category}."]
    for person, value in zip(people, values, strict=True):
        parts.append(fact(person, value))
        # Filler of random length: near and far facts in every batch, so the lookup is learned at short range
        # first and then holds at long range.
        if filler := synthetic.filler(rng, corpus, int(rng.integers(options.filler_chars + 1))):
            parts.append(filler)
    lines = [" ".join(parts)]
    lines += [f"{ANSWER_CUE} {fact(people[k], values[k])}" for k in rng.permutation(options.facts)]
    return "\n".join(lines) + "\n"


def as_example(document: str) -> Example:
    """The evaluation example of a document: everything before its first recall's value, and that value."""
    first_recall = document.index(f"\n{ANSWER_CUE} ") + 1
    person, value = document[first_recall + len(ANSWER_CUE):].split("\n", 1)[0].split()
    cut = first_recall + len(f"{ANSWER_CUE} {person}")
    return Example(document[:cut], value.rstrip("."))


def retrieval_examples(options: RetrievalOptions, corpus_validation: Sequence[str], count: int) -> list[Example]:
    """The first `count` held-out examples (validation documents: validation filler, validation seed)."""
    filler = OneLineTexts(corpus_validation)
    return [as_example(retrieval_document(options, "validation", i, filler)) for i in range(count)]


def mixed_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    options, inner = parse_spec(argument)

    def document_of(split: str) -> synthetic.DocumentFn:
        return lambda index, filler: retrieval_document(options, split, index, filler)

    splits = synthetic.mixed_splits(get_text_source(inner, data_dir=data_dir), options.share, document_of)
    return TextSource(f"{PREFIX}:{argument}", splits)


register_text_source(PREFIX, mixed_source, form="retrieval:[<k=v,...>:]<text source>")
