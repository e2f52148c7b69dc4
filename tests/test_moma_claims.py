"""The MoMa report's claim lines from hand-made savings rows: each verdict follows the numbers and the noise bar."""

from experiments.moma.claims import claim_lines, too_small_line


def row(variant, eta=None, text=None, image=None):
    return {"run": variant, "variant": variant, "eta": eta, "eta_text": text, "eta_image": image}


def verdicts(lines):
    return [line.split(": ")[1] for line in lines]


def test_claims_hold_only_when_the_numbers_say_so():
    dense = row("dense")
    shown = claim_lines([dense, row("moe_4t4i", 2.0, 1.5, 3.0), row("moe_8x", 1.4), row("mod_moe_4t4i", 2.5)])
    assert verdicts(shown) == ["reproduced"] * 3 + ["not measured"]
    assert "ours 4t4i 2.00x, 8x 1.40x" in shown[0] and "ours image 3.00x, text 1.50x" in shown[1]
    assert "one dense seed, so no noise bar" in shown[0]
    missed = claim_lines([dense, row("moe_4t4i", 1.2, 1.3, 1.1), row("moe_8x", 1.5), row("mod_moe_4t4i")])
    assert verdicts(missed)[:3] == ["NOT reproduced"] * 3
    assert "– (never reaches dense's final loss)" in missed[2]
    absent = claim_lines([dense, row("moe_4t4i", 1.2, 1.3, 1.1)])
    assert verdicts(absent) == ["not measured", "NOT reproduced", "not measured", "not measured"]


def test_a_difference_inside_the_dense_seed_noise_bar_does_not_count():
    rows = [row("dense"), row("dense_seed1"), row("moe_4t4i", 1.30, 1.10, 1.25), row("moe_8x", 1.12),
            row("mod_moe_4t4i", 1.40)]
    rows[1]["variant"] = "dense"  # a second seed: not a variant of its own
    wide = {"eta": 0.15, "eta_text": 0.05, "eta_image": 0.20}
    # 8x is only 0.12 above 1 and image only 0.15 above text, both inside their bars; MoD is 0.10 above 4t4i
    assert verdicts(claim_lines(rows, wide))[:3] == ["NOT reproduced"] * 3
    narrow = {"eta": 0.05, "eta_text": 0.02, "eta_image": 0.04}
    lines = claim_lines(rows, narrow)
    assert verdicts(lines)[:3] == ["reproduced"] * 3
    assert "noise bar ±0.05" in lines[0] and "noise bar ±0.04" in lines[1]


def test_mod_must_lose_more_than_every_moe_variant_at_causal_inference():
    rows = [row("dense"), row("moe_4t4i", 1.1), row("moe_8x", 1.0)]
    gap = {"moe_4t4i": {"causal_minus_noncausal_loss": 0.01}, "moe_8x": {"causal_minus_noncausal_loss": 0.04},
           "mod_moe_4t4i": {"causal_minus_noncausal_loss": 0.30}}
    line = claim_lines(rows, aux=gap)[3]
    assert verdicts([line]) == ["reproduced"] and "mod_moe_4t4i +0.300, moe_4t4i +0.010, moe_8x +0.040" in line
    gap["moe_8x"]["causal_minus_noncausal_loss"] = 0.5
    assert verdicts(claim_lines(rows, aux=gap)[3:]) == ["NOT reproduced"]
    assert verdicts(claim_lines(rows, aux="not run: no aux routers")[3:]) == ["not measured"]


def test_the_demo_says_it_is_too_small_in_one_line():
    line = too_small_line(40, 64)
    assert "\n" not in line and "too small to show the paper's FLOPs savings" in line and "40 steps" in line


def test_the_tiny_reproduction_trains_a_second_dense_seed_for_the_noise_bar(tmp_path):
    from experiments.moma.reproduce import scale_configs

    configs = scale_configs("tiny", tmp_path / "image_tokenizer")
    assert list(configs) == ["dense", "moe_1t1i", "moe_4t4i", "moe_8x", "mod_moe_4t4i", "dense_seed1"]
    seed_run, dense = configs["dense_seed1"], configs["dense"]
    assert (seed_run.moma.variant, seed_run.seed, dense.seed) == ("dense", 1, 0)
    assert seed_run.model == dense.model and seed_run.moma.image_source == dense.moma.image_source
    # one tokenizer for every run; the demo has no seed run (too small to read a noise bar off)
    assert {config.moma.image_tokenizer.dir for config in configs.values()} == {str(tmp_path / "image_tokenizer")}
    assert list(scale_configs("demo", tmp_path)) == ["dense", "moe_4t4i"]


def test_the_report_shows_each_groups_routed_share_at_the_start_and_the_end(tmp_path):
    import json

    from experiments.moma.reproduce import routed_fraction_table

    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    (tmp_path / "moe_4t4i").mkdir()
    image = [0.7, 0.8, 0.9, 0.6, 1.0]  # the last two average 0.8
    (tmp_path / "moe_4t4i" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "image_routed_fraction": v, "text_routed_fraction": 0.5}) + "\n"
        for i, v in enumerate(image)) + json.dumps({"step": 6, "eval_loss": 2.0}) + "\n")
    lines = routed_fraction_table(tmp_path, ["dense", "moe_4t4i"], window=2)
    assert lines[2:] == ["| moe_4t4i | image | 0.700 | 0.800 |", "| moe_4t4i | text | 0.500 | 0.500 |"]
    assert routed_fraction_table(tmp_path, ["dense"]) == ["No run routes its tokens by expert choice."]
