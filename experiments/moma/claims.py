"""One line per MoMa claim: does our run show the paper's FLOPs savings η, with the numbers (experiments.moma
reproduce's REPORT.md and its summary). A demo-scale run only says it is too small to show η."""

from __future__ import annotations

from typing import Any

# The paper's numbers (1.4B, 1T tokens): η overall and per modality.
PAPER = {"moe_4t4i": 3.7, "moe_4t4i_text": 2.6, "moe_4t4i_image": 5.2, "moe_8x": 3.0, "mod_moe_4t4i": 4.2}
NO_NOISE_BAR = "one seed per variant, so no noise bar"


def too_small_line(steps: int, d_model: int) -> str:
    return (f"Demo scale ({steps} steps of a d_model={d_model} model): too small to show the paper's FLOPs savings "
            "η; the numbers only show that the pipeline runs.")


def claim_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's η claims, each with our numbers ("not measured" when the variant did not run)."""
    eta = {row["variant"]: row for row in rows[1:] if row["run"] == row["variant"]}
    moe, multi = eta.get("moe_4t4i"), eta.get("moe_8x")
    return [_ordering_line(moe, multi), _modality_line(moe), _mod_line(eta.get("mod_moe_4t4i"), moe)]


def _value(row: dict[str, Any] | None, key: str = "eta") -> float | None:
    return None if row is None else row.get(key)


def _text(value: float | None) -> str:
    return "– (never reaches dense's final loss)" if value is None else f"{value:.2f}x"


def _verdict(holds: bool | None) -> str:
    return "not measured" if holds is None else ("reproduced" if holds else "NOT reproduced")


def _ordering_line(moe: dict[str, Any] | None, multi: dict[str, Any] | None) -> str:
    a, b = _value(moe), _value(multi)
    holds = None if moe is None or multi is None else (a is not None and b is not None and a > b > 1)
    return (f"η(4t4i) > η(8x) > 1 (paper {PAPER['moe_4t4i']}x > {PAPER['moe_8x']}x): {_verdict(holds)}: ours "
            f"4t4i {_text(a)}, 8x {_text(b)}; {NO_NOISE_BAR}.")


def _modality_line(moe: dict[str, Any] | None) -> str:
    text, image = _value(moe, "eta_text"), _value(moe, "eta_image")
    holds = None if moe is None else (text is not None and image is not None and image > text)
    return (f"4t4i saves more on images than on text (paper image {PAPER['moe_4t4i_image']}x > text "
            f"{PAPER['moe_4t4i_text']}x): {_verdict(holds)}: ours image {_text(image)}, text {_text(text)}.")


def _mod_line(mod: dict[str, Any] | None, moe: dict[str, Any] | None) -> str:
    a, b = _value(mod), _value(moe)
    holds = None if mod is None or moe is None else (a is not None and (b is None or a > b))
    return (f"MoD on top of 4t4i saves more (paper {PAPER['mod_moe_4t4i']}x vs {PAPER['moe_4t4i']}x): "
            f"{_verdict(holds)}: ours MoD 4t4i {_text(a)}, 4t4i {_text(b)}.")
