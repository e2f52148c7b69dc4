"""The sweep planner's arithmetic and one end-to-end micro sweep (real tokenizers, real training, fits, report)."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_core.data import get_text_source
from lm_core.errors import UserError
from tests.helpers import pydoc_corpus, run_cli, step_line_after, sweep_config_text
from vocab_scaling.sweep import ModelGroup, chars_for_budget, isoflop_points, plan_sweep
from vocab_scaling.tokenization_curve import FCurve

FLAT_F = FCurve(0.0, 0.0, 0.25)  # 0.25 tokens per character at every V: easy hand arithmetic


def test_chars_for_budget_hand_value():
    # C = 6 (N_nv + V d) H f  ->  H = 6e9 / (6 * (1000 + 100 * 10) * 0.25) = 2e6
    assert chars_for_budget(6e9, 1000, 100, 10, FLAT_F) == pytest.approx(2e6)


def test_plan_sweep_isoflop_design():
    group = ModelGroup("g", d_model=32, num_layers=1, num_heads=2, d_ff=64)
    n_nv = group.non_vocab_params()
    # one layer: attention 4*32*32 + FFN 3*32*64 + two norms 2*32, plus the final norm 32
    assert n_nv == 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    runs = plan_sweep([group], [256, 512], [1e9, 1e8], FLAT_F, tokens_per_step=100, min_steps=1)
    assert [(r.vocab_size, r.flops_budget) for r in runs] == [(256, 1e8), (256, 1e9), (512, 1e8), (512, 1e9)]
    for run in runs:
        assert 6 * (n_nv + run.vocab_size * 32) * run.chars * 0.25 == pytest.approx(run.flops_budget)
        assert run.tokens == pytest.approx(run.chars * 0.25)
        assert run.steps == round(run.tokens / 100)
    # a larger vocabulary buys fewer tokens at the same budget
    assert runs[0].tokens > runs[2].tokens
    with pytest.raises(UserError, match="reaches 10000 steps"):
        plan_sweep([group], [256], [1e6], FLAT_F, tokens_per_step=100, min_steps=10000)
    # repeats with other seeds, for the seeded vocabulary sizes only, under their own names
    seeded = plan_sweep([group], [256, 512], [1e9], FLAT_F, tokens_per_step=100, min_steps=1, extra_seeds=(1, 2),
                        seeded_vocab_sizes=(512,))
    assert [(r.vocab_size, r.seed) for r in seeded] == [(256, 0), (512, 0), (512, 1), (512, 2)]
    assert seeded[1].name == "g_V512_C1.00e09" and seeded[3].name == "g_V512_C1.00e09_s2"
    assert seeded[3].steps == seeded[1].steps and seeded[3].as_row()["seed"] == 2
    with pytest.raises(UserError, match=r"seeded vocabulary sizes \[1024\]"):
        plan_sweep([group], [256], [1e9], FLAT_F, tokens_per_step=100, extra_seeds=(1,), seeded_vocab_sizes=(1024,))


def test_isoflop_points_convert_characters_to_flops():
    rows = [{"step": 10, "chars": 400.0, "tokens": 100, "eval_loss": 3.0, "eval_unigram_nll": -0.5, "eval_bpc": 2.0},
            {"step": 20, "chars": 800.0, "tokens": 200, "eval_loss": 2.5, "eval_unigram_nll": math.nan}]
    points = isoflop_points(rows, n_nv=1000, vocab_size=100, d=10, f=FLAT_F)
    assert len(points) == 1  # the non-finite evaluation is dropped
    assert points[0]["C"] == pytest.approx(6 * 2000 * 400 * 0.25)
    assert points[0]["L_u"] == -0.5


MICRO_SWEEP = dict(groups=(dict(name="a", d_model=32, num_layers=1, num_heads=2, d_ff=64),
                           dict(name="b", d_model=48, num_layers=2, num_heads=2, d_ff=96)),
                   vocab_sizes=(384, 448, 512), budgets=(3e9,), min_steps=5, warmup_fraction=0.1, evals_per_run=2,
                   eval_chars=20_000, extra_seeds=(1,), seeded_vocab_sizes=(448,))


def run_sweep_cli(config_file: Path, workdir: Path, env: dict[str, str], stop_at_run: int = 0
                  ) -> subprocess.CompletedProcess:
    """The sweep entrypoint in a subprocess; with stop_at_run, SIGTERM once it starts that run's training."""
    command = [sys.executable, "-m", "experiments.vocab_scaling.sweep", f"--config={config_file}",
               f"--workdir={workdir}"]
    return run_cli(command, env, step_line_after(f"== run {stop_at_run} of") if stop_at_run else None)


@pytest.mark.slow
def test_micro_sweep_end_to_end_and_a_stop_resumes_to_the_same_results(tmp_path):
    corpus = pydoc_corpus(tmp_path / "corpus", 40)
    config_file = tmp_path / "micro_sweep.py"
    config_file.write_text(sweep_config_text(f"files:{corpus}/*.txt", **MICRO_SWEEP))
    env = dict(os.environ, LM_CORE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    whole = run_sweep_cli(config_file, tmp_path / "sweep", env)
    assert whole.returncode == 0, whole.stdout[-2000:]
    text = (tmp_path / "sweep" / "REPORT.md").read_text()
    assert "## Fitted constants" in text and "| 512 |" in text and "## The paper's claims on our runs" in text
    assert (tmp_path / "sweep" / "isoflop.png").stat().st_size > 0
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("name,group,N_nv,V,d,N_v,budget,seed,") and len(rows) > 6
    seeds = {(row["V"], row["seed"]) for row in csv.DictReader(rows)}
    assert ("448", "1") in seeds and ("512", "1") not in seeds  # the seeded V's repeat, the others do not
    # epochs: the characters trained so far over the training split's
    train = get_text_source(f"files:{corpus}/*.txt").split("train")
    train_chars = sum(len(train[i]) for i in range(len(train)))
    for row in csv.DictReader(rows):
        assert float(row["epochs"]) == pytest.approx(float(row["H"]) / train_chars, rel=1e-9)
    assert "| epochs |" in text and "- Passes over the training split (the runs table's epochs): " in text

    # SIGTERM in the middle of the third run: exit 143, that run is not marked finished, later runs not started;
    # the rerun resumes it and ends with the uninterrupted sweep's results
    stopped = run_sweep_cli(config_file, tmp_path / "stopped", env, stop_at_run=3)
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    finished = sorted(p.parent.name for p in (tmp_path / "stopped" / "runs").glob("*/result.json"))
    assert len(finished) == 2 and not (tmp_path / "stopped" / "results.csv").exists()
    resumed = run_sweep_cli(config_file, tmp_path / "stopped", env)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert (tmp_path / "stopped" / "results.csv").read_text() == "\n".join(rows) + "\n"


def test_every_vocabulary_is_scored_on_the_same_characters(tmp_path, monkeypatch):
    from experiments.vocab_scaling.task import leading_documents, same_text_data
    from lm_core.config import ModelConfig
    from lm_core.run_config import default_config

    monkeypatch.setenv("LM_CORE_CACHE", str(tmp_path / "cache"))
    corpus = pydoc_corpus(tmp_path / "corpus", 60)
    assert leading_documents(["ab", "cde", "f"], 4) == ["ab", "cde"] and leading_documents(["ab"], 0) == ["ab"]
    config = default_config()
    config.data.source = f"files:{corpus}/*.txt"
    config.data.seq_len, config.data.global_batch_size, config.eval_batches = 32, 4, 1
    covered = {}
    for vocab_size in (400, 800):
        config.model.vocab_size = vocab_size
        data = same_text_data(6_000)(config, tmp_path / f"run{vocab_size}", ModelConfig(vocab_size=vocab_size))
        assert data.tokenizer.vocab_size == vocab_size
        tokens = sum(float(b["loss_mask"].sum()) for b in data.eval_batches)
        covered[vocab_size] = (sum(float(b["chars"].sum()) for b in data.eval_batches), tokens)
    # the same characters (whole documents, >= 6,000 of them), in fewer tokens at the larger vocabulary; the
    # trainer's own eval_batches=1 would have covered 4 x 32 tokens only
    assert covered[400][0] == covered[800][0] >= 6_000
    assert covered[800][1] < covered[400][1] and covered[800][1] > 4 * 32


def test_unigram_table_counts_each_documents_eos_target(tmp_path):
    # the model is scored on each document's tokens and then its EOS (never on BOS), so the table counts those
    from experiments.vocab_scaling.runner import log_unigram
    from lm_core.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    p = np.exp(log_unigram(tokenizer, ["ab", "a"], tmp_path / "V.npy"))
    a, b = tokenizer.encode("ab")
    seen = {a: 2, b: 1, tokenizer.eos_id: 2}
    total = sum(seen.values()) + tokenizer.vocab_size - len(seen)  # every unseen id counts 1
    np.testing.assert_allclose(p[tokenizer.eos_id], 2 / total, rtol=1e-6)
    np.testing.assert_allclose(p[a], 2 / total, rtol=1e-6)
    np.testing.assert_allclose(p[tokenizer.bos_id], 1 / total, rtol=1e-6)
    np.testing.assert_allclose(np.exp(log_unigram(tokenizer, [], tmp_path / "V.npy")), p)  # cached


def test_approach2_anchor_is_the_smallest_models_best_v_where_it_is_compute_optimal():
    from experiments.vocab_scaling.report import _anchor

    def run(n_nv, d, vocab, budget, loss):
        return {"N_nv": n_nv, "N_v": vocab * d, "V": vocab, "budget": budget, "L_u": loss}

    finals = [run(1e5, 64, 512, 1e11, 3.0), run(1e5, 64, 1024, 1e11, 3.1), run(4e5, 128, 512, 1e11, 3.2),
              run(1e5, 64, 512, 1e12, 2.9), run(1e5, 64, 1024, 1e12, 2.8), run(4e5, 128, 1024, 1e12, 2.6)]
    # at 1e12 the larger model wins, so the smallest one's compute-optimal budget is 1e11, where V=512 is best
    assert _anchor(finals) == (1e5, 512 * 64)
    # a smallest model that never wins is anchored at its smallest budget
    assert _anchor([dict(p, L_u=p["L_u"] + (1.0 if p["N_nv"] == 1e5 else 0.0)) for p in finals]) == (1e5, 512 * 64)


def test_claims_say_whether_the_best_vocabulary_moves_up_beyond_the_noise():
    from experiments.vocab_scaling import claims

    def point(vocab, budget, loss, seed=0):
        return {"group": "g", "V": vocab, "budget": budget, "L_u": loss, "bpc": 1.0, "seed": seed}

    small = [point(512, 1e11, -1.0), point(1024, 1e11, -1.2), point(1024, 1e11, -1.18, seed=1),
             point(2048, 1e11, -1.1), point(4096, 1e11, -0.9)]
    large = [point(512, 1e12, -2.0), point(1024, 1e12, -2.2), point(1024, 1e12, -2.22, seed=1),
             point(2048, 1e12, -2.4), point(4096, 1e12, -2.3)]
    finals = small + large
    assert claims.seed_noise(finals) == pytest.approx(0.02)
    means = claims.seed_means(finals)
    assert len(means) == 8
    assert sorted(p["L_u"] for p in means if p["V"] == 1024) == [pytest.approx(-2.21), pytest.approx(-1.19)]
    line = claims.compute_claim(means, claims.seed_noise(finals))
    # 1024 -> 2048 is x2.0, both interior, and at 1e12 V=2048 beats V=1024 by 0.19 > 0.02
    assert line.startswith("Best V grows with compute") and "REPRODUCED" in line and "x2.00" in line
    assert "beats V=1024 by 0.1900" in line
    # an optimum at the edge of the V range, or a margin inside the noise bar, is not called a shift
    edge = [dict(p, L_u=p["L_u"] - 1.0) if p["V"] == 4096 and p["budget"] == 1e12 else p for p in means]
    assert "NOT reproduced" in claims.compute_claim(edge, 0.02) and "at an edge" in claims.compute_claim(edge, 0.02)
    assert "NOT reproduced" in claims.compute_claim(means, 0.5)
    assert "NOT reproduced" in claims.compute_claim(means, None) and "no noise bar" in claims.compute_claim(means, None)
    assert "not testable" in claims.compute_claim(claims.seed_means(small), 0.02)
    assert claims.shift_claims(means, 0.02)[0].startswith("Under/over-training shift in group g")


def test_interpolated_optimum_is_the_vertex_of_a_quadratic_in_log_v():
    from experiments.vocab_scaling import claims

    def curve(center, budget, seed_shift=0.0):
        # L_u = (ln V - ln center)^2 - 1 exactly: the vertex is `center`
        points = [{"group": "g", "V": v, "budget": budget, "L_u": (math.log(v / center)) ** 2 - 1.0, "seed": 0}
                  for v in (256, 512, 1024, 2048)]
        return points + [{**points[1], "L_u": points[1]["L_u"] + seed_shift, "seed": 1}]

    assert claims.interpolated_best_v(curve(700, 1e11)[:4]) == pytest.approx(700)
    # two points, a curve without a minimum, or a vertex outside the swept range give no optimum
    assert claims.interpolated_best_v(curve(700, 1e11)[:2]) is None
    assert claims.interpolated_best_v([dict(p, L_u=-p["L_u"]) for p in curve(700, 1e11)[:4]]) is None
    assert claims.interpolated_best_v(curve(5000, 1e11)[:4]) is None
    # one variant per seed: seed 1's curve swaps in its own V=512 run and keeps the single runs
    variants = claims.seed_variants(curve(700, 1e11, seed_shift=0.1))
    assert [sorted((p["V"], p["seed"]) for p in v) for v in variants] == [
        [(256, 0), (512, 0), (1024, 0), (2048, 0)], [(256, 0), (512, 1), (1024, 0), (2048, 0)]]
    (line,) = claims.interpolated_shift_lines(curve(700, 1e11, 0.1) + curve(1400, 1e12))
    # the seed-averaged curve's vertex moves a little (0.05 at V=512); seed 0's is exact, seed 1's further off
    assert line.startswith("Interpolated optimum in group g") and "V 702 at C=1.00e+11 (seeds 700-704)" in line
    assert "-> 1400 at C=1.00e+12 (seeds 1400-1400), x1.99" in line


def test_sweep_groups_are_named_dicts_and_old_positional_tuples_still_read():
    from experiments.vocab_scaling.runner import parse_groups
    from lm_core.errors import UserError
    from vocab_scaling.sweep import ModelGroup

    named = dict(name="g", d_model=48, num_layers=2, num_heads=4, d_ff=144)
    assert parse_groups([named]) == parse_groups([("g", 48, 2, 4, 144)]) == [ModelGroup("g", 48, 2, 4, 144)]
    for bad in (dict(name="g", d_model=48, num_layers=2, heads=4, d_ff=144), ("g", 48, 2, 4)):
        with pytest.raises(UserError, match=r"^sweep group .* is invalid; valid: dict\(name=\.\.\."):
            parse_groups([bad])
