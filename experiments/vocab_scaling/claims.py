"""The paper's claims, checked on our sweep's final evaluations: one line each, saying whether our runs show it.

- "Larger budgets deserve larger vocabularies": along the IsoFLOP envelope (the best run of any group at each
  budget), the best V at the largest budget against the smallest one's.
- The under/over-training shift (Approach 3): within one model group (fixed N_nv), the best V at a larger budget.
- The three approaches agree in direction: each fitted approach predicts a larger V for a larger model.

Runs repeated with several seeds are averaged; the noise bar is the largest seed-to-seed L_u difference of one
run. A shift counts only if the larger budget's best V beats the smaller budget's best V there by more than it.
Between grid points, `interpolated_best_v` places each curve's optimum at the vertex of a quadratic in ln V (what
the paper's IsoFLOP curves are fitted with); `interpolated_shift_lines` says how far it moves, for information:
the verdicts above stay on the swept grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MIN_RATIO = 1.5  # a best V that grows by less than this over the budgets swept is not called a shift


def seed_means(finals: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (group, V, budget): L_u and bits/char averaged over its seeds, `seeds` how many."""
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for point in finals:
        runs.setdefault((point["group"], point["V"], point["budget"]), []).append(point)
    return [{**same[0], "L_u": sum(p["L_u"] for p in same) / len(same),
             "bpc": sum(p["bpc"] for p in same) / len(same), "seeds": len(same)} for same in runs.values()]


def seed_noise(finals: Sequence[dict[str, Any]]) -> float | None:
    """The largest |L_u difference| between seeds of one (group, V, budget); None without repeated runs."""
    runs: dict[tuple, list[float]] = {}
    for point in finals:
        runs.setdefault((point["group"], point["V"], point["budget"]), []).append(point["L_u"])
    spreads = [max(values) - min(values) for values in runs.values() if len(values) > 1]
    return max(spreads) if spreads else None


def best_point(points: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(the lowest-L_u point, whether its V lies strictly inside the V range its group swept at that budget)."""
    best = min(points, key=lambda p: p["L_u"])
    same_curve = [p["V"] for p in points if p["group"] == best["group"]]
    return best, min(same_curve) < best["V"] < max(same_curve)


def shift_verdict(small: Sequence[dict[str, Any]], large: Sequence[dict[str, Any]], noise: float | None) -> str:
    """Whether the best V moves up from the `small` budget's points to the `large` budget's, in words."""
    (low, low_inside), (high, high_inside) = best_point(small), best_point(large)
    ratio = high["V"] / low["V"]
    rival = [p for p in large if p["V"] == low["V"] and p["group"] == low["group"]]
    margin = rival[0]["L_u"] - high["L_u"] if rival else math.nan
    noise_text = f"noise bar ±{noise:.4f}" if noise is not None else "no repeated seeds, so no noise bar"
    shown = (ratio >= MIN_RATIO and low_inside and high_inside and noise is not None and margin > noise)
    return (f"{'REPRODUCED' if shown else 'NOT reproduced'}: best V {low['V']} at C={low['budget']:.2e} "
            f"({'interior' if low_inside else 'at an edge of the V range'}) -> {high['V']} at "
            f"C={high['budget']:.2e} ({'interior' if high_inside else 'at an edge'}), x{ratio:.2f} (needs "
            f"x{MIN_RATIO}); at the larger budget V={high['V']} beats V={low['V']} by {margin:.4f} L_u, "
            f"{noise_text}")


def compute_claim(means: Sequence[dict[str, Any]], noise: float | None) -> str:
    budgets = sorted({p["budget"] for p in means})
    if len(budgets) < 2:
        return "Best V grows with compute: not testable, the sweep has one budget."
    at = {b: [p for p in means if p["budget"] == b] for b in (budgets[0], budgets[-1])}
    return "Best V grows with compute (IsoFLOP envelope, all groups): " + shift_verdict(
        at[budgets[0]], at[budgets[-1]], noise) + "."


def shift_claims(means: Sequence[dict[str, Any]], noise: float | None) -> list[str]:
    lines = []
    for group in sorted({p["group"] for p in means}):
        mine = [p for p in means if p["group"] == group]
        budgets = sorted({p["budget"] for p in mine})
        if len(budgets) >= 2:
            small, large = ([p for p in mine if p["budget"] == b] for b in (budgets[0], budgets[-1]))
            lines.append(f"Under/over-training shift in group {group} (fixed N_nv): "
                         + shift_verdict(small, large, noise) + ".")
    return lines or ["Under/over-training shift: not testable, no group was trained at two budgets."]


def approaches_claim(predict: Callable[[float, float], dict[str, Any]], models: Sequence[tuple[float, float]],
                     fitted: Sequence[str]) -> str:
    """`predict(n_nv, d)` -> {"approach1": {"V": ...}, ...} with our fitted constants, for our smallest and
    largest model: does every fitted approach give the larger model the larger V?"""
    (small_n, small_d), (large_n, large_d) = min(models), max(models)
    names = [n for n in ("approach1", "approach2", "approach3") if f"Approach {n[-1]}" in fitted]
    if small_n == large_n or len(names) < 2:
        return (f"The approaches agree in direction: not testable ({len(names)} of 3 approaches fitted on "
                f"{len({n for n, _ in models})} model size(s)).")
    small, large = predict(small_n, small_d), predict(large_n, large_d)
    grows = {n: large.get(n, {}).get("V", math.nan) > small.get(n, {}).get("V", math.nan) for n in names}
    values = ", ".join(f"{n}: V {small.get(n, {}).get('V', math.nan):.0f} -> {large.get(n, {}).get('V', math.nan):.0f}"
                       for n in names)
    verdict = "REPRODUCED" if all(grows.values()) else "NOT reproduced"
    return (f"The approaches agree in direction (our fits, N_nv {small_n:,.0f} -> {large_n:,.0f}): {verdict}: "
            f"{values}.")


def interpolated_best_v(points: Sequence[dict[str, Any]]) -> float | None:
    """The V at the vertex of the least-squares quadratic in ln V through one IsoFLOP curve's (V, L_u) points;
    None with fewer than 3 V's, a curve without a minimum, or a vertex outside the swept range."""
    vocab = sorted({p["V"] for p in points})
    if len(vocab) < 3:
        return None
    mean_loss = {v: np.mean([p["L_u"] for p in points if p["V"] == v]) for v in vocab}
    a, b, _ = np.polyfit(np.log(vocab), [mean_loss[v] for v in vocab], 2)
    if a <= 0:
        return None
    vertex = math.exp(-b / (2 * a))
    return vertex if vocab[0] <= vertex <= vocab[-1] else None


def seed_variants(points: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The curve once per seed: each repeated V taken from that seed's run (others from their only run), so the
    spread of `interpolated_best_v` over the variants is its seed noise."""
    seeds = sorted({p.get("seed", 0) for p in points})
    variants = []
    for seed in seeds:
        chosen = {}
        for p in sorted(points, key=lambda p: p.get("seed", 0) != seed):
            chosen.setdefault(p["V"], p)
        variants.append(list(chosen.values()))
    return variants


def interpolated_shift_lines(finals: Sequence[dict[str, Any]]) -> list[str]:
    """Per group: the interpolated optimum at its smallest and largest budget, with its range over seeds."""
    lines = []
    for group in sorted({p["group"] for p in finals}):
        budgets = sorted({p["budget"] for p in finals if p["group"] == group})
        optima = []
        for budget in (budgets[0], budgets[-1]):
            curve = [p for p in finals if p["group"] == group and p["budget"] == budget]
            found = [v for v in map(interpolated_best_v, seed_variants(curve)) if v is not None]
            optima.append((budget, interpolated_best_v(curve), found))
        if len(budgets) < 2 or any(best is None for _, best, _ in optima):
            continue
        (low_c, low, low_seeds), (high_c, high, high_seeds) = optima
        lines.append(f"Interpolated optimum in group {group} (vertex of a quadratic in ln V, for information): "
                     f"V {low:.0f} at C={low_c:.2e} (seeds {min(low_seeds):.0f}-{max(low_seeds):.0f}) -> "
                     f"{high:.0f} at C={high_c:.2e} (seeds {min(high_seeds):.0f}-{max(high_seeds):.0f}), "
                     f"x{high / low:.2f}.")
    return lines
