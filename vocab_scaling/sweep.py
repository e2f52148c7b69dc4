"""IsoFLOP sweep planning: model groups x vocabulary sizes x FLOPs budgets -> concrete training runs.

A run trains a model of fixed non-vocabulary size N_nv with vocabulary V for a FLOPs budget C. In the paper's
accounting C = 6 (N_nv + V·d) · H · f(V), so the characters H (and tokens D = H·f(V), and steps) follow from the
budget: larger vocabularies cost more per token but need fewer tokens per character.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.flops import param_counts
from vocab_scaling.tokenization_curve import FCurve


@dataclasses.dataclass(frozen=True)
class ModelGroup:
    """One model size of the sweep (the vocabulary varies inside the group, everything else is fixed)."""

    name: str
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int

    def model_config(self, vocab_size: int, max_seq_len: int) -> ModelConfig:
        # Untied embeddings, as in the paper's model family.
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                           num_heads=self.num_heads, d_ff=self.d_ff, max_seq_len=max_seq_len, tie_embeddings=False)

    def non_vocab_params(self) -> int:
        return param_counts(self.model_config(vocab_size=256, max_seq_len=128)).non_vocab


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    group: ModelGroup
    vocab_size: int
    flops_budget: float  # C in the paper's convention
    n_nv: int
    chars: float  # H: characters of training text the budget buys
    tokens: float  # D = H · f(V)
    steps: int
    seed: int = 0  # added to the config's seed: repeats of a run for a noise bar

    @property
    def name(self) -> str:
        repeat = f"_s{self.seed}" if self.seed else ""
        return f"{self.group.name}_V{self.vocab_size}_C{self.flops_budget:.2e}{repeat}".replace("+", "")

    @property
    def n_v(self) -> int:
        return self.vocab_size * self.group.d_model

    def as_row(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group.name, "N_nv": self.n_nv, "V": self.vocab_size,
                "d": self.group.d_model, "budget": self.flops_budget, "planned_H": self.chars,
                "planned_D": self.tokens, "steps": self.steps, "seed": self.seed}


def chars_for_budget(flops_budget: float, n_nv: float, vocab_size: float, d: float, f: FCurve) -> float:
    """H such that 6 (N_nv + V·d) · H · f(V) = C."""
    return flops_budget / (6.0 * (n_nv + vocab_size * d) * f(vocab_size))


def plan_sweep(groups: Sequence[ModelGroup], vocab_sizes: Sequence[int], budgets: Sequence[float], f: FCurve, *,
               tokens_per_step: int, min_steps: int = 20, extra_seeds: Sequence[int] = (),
               seeded_vocab_sizes: Sequence[int] = ()) -> list[PlannedRun]:
    """Every (group, V, budget) run whose budget buys at least `min_steps` optimizer steps, and for the V's in
    `seeded_vocab_sizes` one repeat per extra seed (the same run with another initialisation and data order)."""
    if not groups or not vocab_sizes or not budgets:
        raise UserError("a sweep needs at least one model group, one vocabulary size and one budget")
    bad = [v for v in vocab_sizes if v <= 0] + [c for c in budgets if not c > 0]
    if bad:
        raise UserError(f"vocabulary sizes and budgets must be positive, got {bad}")
    runs = []
    for group in groups:
        n_nv = group.non_vocab_params()
        for vocab_size in sorted(vocab_sizes):
            for budget in sorted(budgets):
                chars = chars_for_budget(budget, n_nv, vocab_size, group.d_model, f)
                tokens = chars * f(vocab_size)
                steps = int(round(tokens / tokens_per_step))
                if steps >= min_steps:
                    seeds = (0, *extra_seeds) if vocab_size in seeded_vocab_sizes else (0,)
                    runs += [PlannedRun(group, vocab_size, budget, n_nv, chars, tokens, steps, seed)
                             for seed in seeds]
    if not runs:
        raise UserError(f"no run of the sweep reaches {min_steps} steps; raise the budgets")
    if unknown := sorted(set(seeded_vocab_sizes) - set(vocab_sizes)):
        raise UserError(f"seeded vocabulary sizes {unknown} are not among the sweep's {sorted(vocab_sizes)}")
    return runs


def paper_flops_of(n_nv: float, vocab_size: float, d: float, chars: float, f: FCurve) -> float:
    return 6.0 * (n_nv + vocab_size * d) * chars * f(vocab_size)


def log_spaced(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [low]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def isoflop_points(eval_rows: Sequence[dict[str, Any]], n_nv: float, vocab_size: float, d: float, f: FCurve
                   ) -> list[dict[str, float]]:
    """(C, L_u) along one run's training from its evaluation rows (characters seen -> FLOPs spent so far)."""
    points = []
    for row in eval_rows:
        if "eval_unigram_nll" in row and row.get("chars", 0) > 0 and math.isfinite(row["eval_unigram_nll"]):
            points.append({"C": paper_flops_of(n_nv, vocab_size, d, row["chars"], f), "H": row["chars"],
                           "D": row["tokens"], "L_u": row["eval_unigram_nll"], "loss": row["eval_loss"],
                           "bpc": row.get("eval_bpc", math.nan), "step": row["step"]})
    return points
