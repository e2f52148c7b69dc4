"""A closed-book knowledge task: a fixed table of synthetic facts, learned in training, asked about in new words.

The paper's accuracy gains are on closed-book TriviaQA: the answer is nowhere in the prompt, it is knowledge the
base model stored in its weights during pretraining, and KV prediction lets a small auxiliary model's prompt
reading reach that knowledge. This task isolates exactly that:

- A table of `entities` invented countries, each with one value per relation (its capital, language, river and
  currency), all invented words, so nothing in the corpus gives an answer away: `entities x 4` facts.
- Training documents (`knowledge:<source>`) state a few facts each, every fact in one of its relation's five
  training templates (two statements, three question wordings answered), in random order between stretches of
  corpus text:

      The capital of Zorbia is Kelmar. <corpus text> Question: Which language is spoken in Vostrand?
      Answer: Ilvenic
      <corpus text>

- Evaluation asks every fact once, 1-shot, in a sixth wording no training document uses (a solved question
  about another country, then the question), and scores the greedy answer by exact match:

      Question: What is the capital of Brennia?
      Answer: Tolvik
      Question: What is the capital of Zorbia?
      Answer:

  Training on several wordings is what lets a small model answer a new one (with one wording ours answered the
  trained one 86% of the time and a new one 0%): it learns to answer from the entity and relation words.

A model answers only from what its weights hold, so the score tracks knowledge, not prompt reading: a small
auxiliary model trained as long as the base stores less of the table than the base does (the premise of the
paper's gains), and a cache carrying nothing (`null_cache`) leaves the base at chance (1 / `values`).

`knowledge:[k=v,...:]<source>` (registered with `lm_core.data` on import) is `<source>` with fact documents added
to both splits; `knowledge:share=0.3,entities=128:retrieval:builtin` nests with the recall task's source. Every
document is a pure function of (options, split, index).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from kv_prediction import (
    retrieval,  # noqa: F401  (registers retrieval:<source>, which nests inside)
    synthetic,
)
from kv_prediction.synthetic import Example
from lm_core.data.sources import TextSource, get_text_source, register_text_source
from lm_core.errors import UserError

PREFIX = "knowledge"
# relation -> (statement templates, question wordings training documents use, the wording evaluation asks);
# {e} the entity, {v} the value. Training asks each fact in three wordings, so a model learns to answer from the
# entity and relation words rather than from one sentence; evaluation asks in a fourth it never saw.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "capital": (("The capital of {e} is {v}.", "{v} is the capital city of {e}."),
                ("Name the capital of {e}.", "Which city is the capital of {e}?", "Tell me the capital of {e}."),
                "What is the capital of {e}?"),
    "language": (("People in {e} speak {v}.", "The language of {e} is {v}."),
                 ("Name the language of {e}.", "Which language is spoken in {e}?", "Tell me the language of {e}."),
                 "What language do people in {e} speak?"),
    "river": (("The longest river of {e} is the {v}.", "The {v} flows through {e}."),
              ("Name the river of {e}.", "Which river is the longest in {e}?", "Tell me the river of {e}."),
              "What river flows through {e}?"),
    "currency": (("{e} pays in {v}.", "The currency of {e} is the {v}."),
                 ("Name the currency of {e}.", "Which money is used in {e}?", "Tell me the currency of {e}."),
                 "What is the currency of {e}?"),
}
SYLLABLES = ("ka", "lo", "ven", "dri", "mar", "tos", "bel", "quen", "zor", "fa", "ril", "nu", "sta", "gor", "pel",
             "vi", "dun", "ash", "tre", "mo", "kel", "ban", "sil", "oth", "ra", "wen", "ix", "cor", "lum", "ya")
ENDINGS = {"capital": ("", "ar", "ik", "en"), "language": ("ic", "ish", "ese", "i"), "river": ("a", "on", "ine", "us"),
           "currency": ("el", "o", "ant", "ur")}


@dataclasses.dataclass(frozen=True)
class KnowledgeOptions:
    """The fact table and how its documents are mixed in."""

    share: float = 0.3  # fraction of the mixed split's characters that are fact documents
    entities: int = 128  # invented countries; the table has entities x len(RELATIONS) facts
    values: int = 32  # distinct values per relation (guessing scores about 1/values)
    facts: int = 4  # facts stated per training document
    filler_chars: int = 80  # at most this many characters of corpus text after each fact
    seed: int = 0  # the table's seed (documents are drawn from it per split)

    def __post_init__(self) -> None:
        synthetic.check_share(PREFIX, self.share)
        checks = [("entities", self.entities, 2, 4096), ("values", self.values, 2, 512),
                  ("facts", self.facts, 1, 16), ("filler_chars", self.filler_chars, 0, 10_000)]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise UserError(f"knowledge {name}={value} is invalid; valid: {low} to {high}")

    def spec(self, source: str) -> str:
        fields = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{PREFIX}:{fields}:{source}"


@dataclasses.dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


def invented_words(rng: np.random.Generator, count: int, syllables: int, ending: Sequence[str] = ("",),
                   taken: set[str] | None = None) -> list[str]:
    """`count` distinct capitalised pseudo-words of `syllables` syllables plus one of `ending`, none in `taken`.

    When words of that length run out (many draws in a row already taken: large tables), later words get one
    syllable more, so any table size terminates; small tables never get there."""
    taken = set() if taken is None else taken
    words: list[str] = []
    misses = 0
    while len(words) < count:
        word = "".join(SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=syllables))
        word = (word + ending[int(rng.integers(len(ending)))]).capitalize()
        if word in taken:
            misses += 1
            if misses == 1000:
                syllables, misses = syllables + 1, 0
            continue
        taken.add(word)
        words.append(word)
        misses = 0
    return words


def fact_table(options: KnowledgeOptions) -> list[Fact]:
    """The facts, entity-major: a pure function of (entities, values, seed)."""
    rng = np.random.default_rng([options.seed, 7919])
    taken: set[str] = set()
    entities = invented_words(rng, options.entities, 2, ("ia", "and", "or", "ea"), taken)
    pools = {relation: invented_words(rng, options.values, 2, ENDINGS[relation], taken) for relation in RELATIONS}
    return [Fact(entity, relation, pools[relation][int(rng.integers(options.values))])
            for entity in entities for relation in RELATIONS]


def training_templates(relation: str) -> tuple[str, ...]:
    """Every way a training document states a fact of `relation`: the statements, then each question answered."""
    statements, questions, _ = RELATIONS[relation]
    return statements + tuple(f"Question: {q}\nAnswer: {{v}}\n" for q in questions)


def statement(fact: Fact, template: int) -> str:
    return training_templates(fact.relation)[template].format(e=fact.entity, v=fact.value)


def knowledge_document(options: KnowledgeOptions, table: Sequence[Fact], split: str, index: int,
                       corpus: Sequence[str]) -> str:
    """Document `index` of `split`: `facts` random facts, each in a random template, with corpus filler."""
    rng = np.random.default_rng([options.seed, synthetic.SPLIT_SEEDS[split], index, 104729])
    parts = []
    for fact_index in rng.choice(len(table), min(options.facts, len(table)), replace=False):
        fact = table[int(fact_index)]
        parts.append(statement(fact, int(rng.integers(len(training_templates(fact.relation))))))
        if filler := synthetic.filler(rng, corpus, int(rng.integers(options.filler_chars + 1))):
            parts.append(filler)
    return " ".join(parts) + "\n"


def question(fact: Fact) -> str:
    return "Question: " + RELATIONS[fact.relation][2].format(e=fact.entity) + "\nAnswer:"


def knowledge_examples(options: KnowledgeOptions, count: int | None = None) -> list[Example]:
    """Every fact of the table asked once (or the first `count`), each after one solved question about another
    entity's same relation."""
    table = fact_table(options)
    rng = np.random.default_rng([options.seed, 15485863])
    by_relation = {relation: [i for i, fact in enumerate(table) if fact.relation == relation] for relation in RELATIONS}
    examples = []
    for index, fact in enumerate(table[:count]):
        same_relation = [i for i in by_relation[fact.relation] if i != index]
        shot = table[same_relation[int(rng.integers(len(same_relation)))]]
        prompt = f"{question(shot)} {shot.value}\n{question(fact)}"
        examples.append(Example(prompt, fact.value))
    return examples


def parse_spec(argument: str) -> tuple[KnowledgeOptions, str]:
    """(options, inner source spec) from the argument of `knowledge:[k=v,...:]<source>`."""
    values, inner = synthetic.parse_options(PREFIX, argument, KnowledgeOptions)
    return KnowledgeOptions(**values), inner


def mixed_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    options, inner = parse_spec(argument)
    table = fact_table(options)

    def document_of(split: str) -> synthetic.DocumentFn:
        return lambda index, filler: knowledge_document(options, table, split, index, filler)

    splits = synthetic.mixed_splits(get_text_source(inner, data_dir=data_dir), options.share, document_of)
    return TextSource(f"{PREFIX}:{argument}", splits)


register_text_source(PREFIX, mixed_source, form="knowledge:[<k=v,...>:]<text source>")
