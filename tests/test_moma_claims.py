"""The MoMa report's claim lines from hand-made savings rows: each verdict follows the numbers."""

from experiments.moma.claims import claim_lines, too_small_line


def row(variant, eta=None, text=None, image=None):
    return {"run": variant, "variant": variant, "eta": eta, "eta_text": text, "eta_image": image}


def test_claims_hold_only_when_the_numbers_say_so():
    dense = row("dense")
    shown = claim_lines([dense, row("moe_4t4i", 2.0, 1.5, 3.0), row("moe_8x", 1.4), row("mod_moe_4t4i", 2.5)])
    assert [line.split(": ")[1] for line in shown] == ["reproduced"] * 3
    assert "ours 4t4i 2.00x, 8x 1.40x" in shown[0] and "ours image 3.00x, text 1.50x" in shown[1]
    missed = claim_lines([dense, row("moe_4t4i", 1.2, 1.3, 1.1), row("moe_8x", 1.5), row("mod_moe_4t4i")])
    assert [line.split(": ")[1] for line in missed] == ["NOT reproduced"] * 3
    assert "– (never reaches dense's final loss)" in missed[2]
    absent = claim_lines([dense, row("moe_4t4i", 1.2, 1.3, 1.1)])
    assert [line.split(": ")[1] for line in absent] == ["not measured", "NOT reproduced", "not measured"]


def test_the_demo_says_it_is_too_small_in_one_line():
    line = too_small_line(40, 64)
    assert "\n" not in line and "too small to show the paper's FLOPs savings" in line and "40 steps" in line
