"""One line per MoMa claim: does our run show the paper's FLOPs savings η, with the numbers (experiments.moma
reproduce's REPORT.md and its summary). A demo-scale run only says it is too small to show η.

A difference counts only beyond the seed-to-seed noise bar: `noise` (experiments.moma.savings.seed_noise) is, per
η key, how far from 1 the η of a second dense seed against the baseline comes out, so "a > b" holds when
a - b > noise (and "> 1" when a - 1 > noise). Without a second dense seed the bar is 0 and the line says so.
"""

from __future__ import annotations

from typing import Any

# The paper's numbers (1.4B, 1T tokens): η overall and per modality.
PAPER = {"moe_4t4i": 3.7, "moe_4t4i_text": 2.6, "moe_4t4i_image": 5.2, "moe_8x": 3.0, "mod_moe_4t4i": 4.2}
MOE_VARIANTS = ("moe_4t4i", "moe_8x")


def too_small_line(steps: int, d_model: int) -> str:
    return (f"Demo scale ({steps} steps of a d_model={d_model} model): too small to show the paper's FLOPs savings "
            "η; the numbers only show that the pipeline runs.")


def claim_lines(rows: list[dict[str, Any]], noise: dict[str, float] | None = None,
                aux: dict[str, dict[str, float]] | str | None = None) -> list[str]:
    """The paper's claims, each with our numbers ("not measured" when a variant did not run): the η ordering,
    images over text, MoD on top of 4t4i, and (with aux-router results) MoD's larger causal-inference loss gap."""
    eta = {row["variant"]: row for row in rows[1:] if row["run"] == row["variant"]}
    moe, multi = eta.get("moe_4t4i"), eta.get("moe_8x")
    return [_ordering_line(moe, multi, noise), _modality_line(moe, noise),
            _mod_line(eta.get("mod_moe_4t4i"), moe, noise), _causal_gap_line(aux)]


def _value(row: dict[str, Any] | None, key: str = "eta") -> float | None:
    return None if row is None else row.get(key)


def _text(value: float | None) -> str:
    return "– (never reaches dense's final loss)" if value is None else f"{value:.2f}x"


def _verdict(holds: bool | None) -> str:
    return "not measured" if holds is None else ("reproduced" if holds else "NOT reproduced")


def _bar(noise: dict[str, float] | None, *keys: str) -> float:
    return 0.0 if noise is None else max(noise[key] for key in keys)


def _bar_text(noise: dict[str, float] | None, *keys: str) -> str:
    if noise is None:
        return "one dense seed, so no noise bar"
    return f"noise bar ±{_bar(noise, *keys):.2f} (a second dense seed's η against the first)"


def _beyond(a: float | None, b: float | None, bar: float) -> bool:
    """a > b by more than the noise bar; a value never reached (None) is below everything."""
    return a is not None and (b is None or a - b > bar)


def _ordering_line(moe: dict[str, Any] | None, multi: dict[str, Any] | None, noise: dict[str, float] | None) -> str:
    a, b, bar = _value(moe), _value(multi), _bar(noise, "eta")
    holds = None if moe is None or multi is None else (_beyond(a, b, bar) and _beyond(b, 1.0, bar))
    return (f"η(4t4i) > η(8x) > 1 (paper {PAPER['moe_4t4i']}x > {PAPER['moe_8x']}x): {_verdict(holds)}: ours "
            f"4t4i {_text(a)}, 8x {_text(b)}; {_bar_text(noise, 'eta')}.")


def _modality_line(moe: dict[str, Any] | None, noise: dict[str, float] | None) -> str:
    text, image = _value(moe, "eta_text"), _value(moe, "eta_image")
    holds = None if moe is None else (text is not None and _beyond(image, text, _bar(noise, "eta_text", "eta_image")))
    return (f"4t4i saves more on images than on text (paper image {PAPER['moe_4t4i_image']}x > text "
            f"{PAPER['moe_4t4i_text']}x): {_verdict(holds)}: ours image {_text(image)}, text {_text(text)}; "
            f"{_bar_text(noise, 'eta_text', 'eta_image')}.")


def _mod_line(mod: dict[str, Any] | None, moe: dict[str, Any] | None, noise: dict[str, float] | None) -> str:
    a, b = _value(mod), _value(moe)
    holds = None if mod is None or moe is None else _beyond(a, b, _bar(noise, "eta"))
    return (f"MoD on top of 4t4i saves more (paper {PAPER['mod_moe_4t4i']}x vs {PAPER['moe_4t4i']}x): "
            f"{_verdict(holds)}: ours MoD 4t4i {_text(a)}, 4t4i {_text(b)}; {_bar_text(noise, 'eta')}.")


def _causal_gap_line(aux: dict[str, dict[str, float]] | str | None) -> str:
    """The paper: MoD models degrade badly at causal inference (aux-router errors), MoE ones do not."""
    claim = "MoD loses more at causal inference (aux routers) than the MoE variants (paper MoD badly, MoE hardly)"
    results = aux if isinstance(aux, dict) else {}
    gaps = {variant: results[variant]["causal_minus_noncausal_loss"]
            for variant in ("mod_moe_4t4i", *MOE_VARIANTS) if variant in results}
    moe_gaps = [gaps[variant] for variant in MOE_VARIANTS if variant in gaps]
    if "mod_moe_4t4i" not in gaps or not moe_gaps:
        return f"{claim}: not measured: no aux-router results for MoD and an MoE variant."
    holds = gaps["mod_moe_4t4i"] > max(moe_gaps)
    shown = ", ".join(f"{variant} {gap:+.3f}" for variant, gap in gaps.items())
    return f"{claim}: {_verdict(holds)}: causal minus expert-choice eval loss (nats) {shown}."
