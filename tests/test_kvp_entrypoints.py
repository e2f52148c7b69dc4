"""The KV-prediction entrypoints end to end at micro size, and their one-line errors."""

import dataclasses
import json
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO = ["--config.model.vocab_size=264", "--config.model.d_model=32", "--config.model.num_layers=4",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.d_ff=64",
         "--config.model.max_seq_len=128", "--config.data.tokenizer=byte", "--config.data.seq_len=32",
         "--config.data.global_batch_size=4", "--config.steps=6", "--config.kvp.steps=4", "--config.log_every=2",
         "--config.kvp.eval_documents=2", "--config.kvp.prompt_tokens=16", "--config.kvp.continuation_tokens=8",
         "--config.kvp.ttft_prompt_len=32", "--config.kvp.ttft_repeats=2",
         "--config.kvp.eval_questions=4", "--config.kvp.answer_tokens=5"]


def pydoc_corpus(tmp_path):
    """12 documents of Python's own help topics as a files: corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in sorted(pydoc_data.topics.topics.items())[:12]:
        (corpus / f"{name}.txt").write_text(text)
    return corpus


def entrypoint(name, *args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", f"experiments.kv_prediction.{name}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_evaluate_ttft_micro(tmp_path):
    corpus = pydoc_corpus(tmp_path)
    source = ("knowledge:entities=4,values=4,facts=2,filler_chars=20:retrieval:facts=2,filler_chars=20:"
              f"files:{corpus}/*.txt")
    common = [f"--config.data.source={source}", *MICRO, "--config.model.max_seq_len=192",
              "--config.kvp.variants=('lp0.50','c32x1')"]
    workdir = tmp_path / "kvp"
    trained = entrypoint("train", f"--workdir={workdir}", *common)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for run in ("base", "pre_c32x1", "kvp_lp0.50", "aux_lp0.50", "kvp_c32x1", "aux_c32x1"):
        assert (workdir / run / "checkpoints").is_dir(), run
    evaluated = entrypoint("evaluate", f"--workdir={workdir}", "--json", *common)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(evaluated.stdout.strip().splitlines()[-1])
    models = [(m["name"], m["kind"]) for m in results["models"] if m["task"] == "closed_book"]
    assert models == [("base", "base"), ("base", "null_cache")] + [
        (aux, kind) for aux in ("lp0.50", "c32x1") for kind in ("aux_only", "kvp", "pruning", "true_question")]
    for model in results["models"]:
        low, high = model["exact_match_ci95"]
        assert 0 <= low <= model["exact_match"] <= high <= 1 and model["questions"] == 4
        assert model["ttft_flops"] > 0 and (model["ttft_s"] is None) == (model["kind"] in ("null_cache",
                                                                                             "true_question"))
    assert {m["task"] for m in results["models"]} == {"closed_book", "recall"}
    assert all(r["perplexity"] is None or r["perplexity"] > 1 for r in results["rows"])
    assert results["claims"] and results["chance"] == {"closed_book": 0.25, "recall": 0.5}
    assert (workdir / "REPORT.md").exists() and (workdir / "pareto_flops.png").exists()
    retrained = entrypoint("train", f"--workdir={workdir}", *common)  # every run is finished: nothing retrains
    assert retrained.returncode == 0 and retrained.stdout.count("(finished,") == 6, retrained.stdout[-3000:]
    evaluated = entrypoint("evaluate", f"--workdir={workdir}", "--json")  # the workdir's saved config
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for args, fragment in [(["--config.kvp.variants=('c32x2@0,1,0,0',)"], "non-decreasing"),
                           (["--config.kvp.variants=('c32x2@0,1',)"], "one per base layer"),
                           (["--config.kvp.variants=('c64x5',)"], "exceeds the base"),
                           (["--config.model.d_ff=96"], "different model"),
                           (["--config.kvp.lambda_consistency=-1.0"], "lambda_consistency=-1.0")]:
        refused = entrypoint("train", f"--workdir={workdir}", *common, *args)  # the last override wins
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1 and fragment in lines[0], refused.stderr[-2000:]
    timed = entrypoint("ttft", f"--workdir={workdir}", "--variant=lp0.50", "--prompt_len=32", "--repeats=2",
                       "--json")
    assert timed.returncode == 0, timed.stderr[-3000:]
    report = json.loads(timed.stdout.strip().splitlines()[-1])
    for key in ("base_ttft_s", "aux_ttft_s", "kvp_ttft_s", "pruning_ttft_s", "flops_reduction", "measured_reduction"):
        assert report[key] > 0


def test_ttft_flops_only_gives_the_papers_reductions_from_openelm_shapes():
    flops = entrypoint("ttft", f"--config={REPO / 'experiments/configs/kvp_paper.py'}", "--prompt_len=1024",
                       "--flops_only", "--json")
    assert flops.returncode == 0, flops.stderr[-3000:]
    rows = json.loads(flops.stdout.strip().splitlines()[-1])["variants"]
    assert set(rows) == {"c1536x20", "c1280x16", "lp0.75", "lp0.50", "lp0.25"}
    for row in rows.values():  # the bar: within 5% of the paper (OpenELM's own shapes: within 0.5%)
        assert abs(row["openelm_reduction"] / row["paper_reduction"] - 1) < 0.005, row
        assert row["flops_reduction"] > 1 and row["per_token_reduction"] > 1


def test_ttft_without_a_workdir_and_bad_input():
    timed = entrypoint("ttft", "--variant=c64x2", "--prompt_len=64", "--repeats=1", "--json")
    assert timed.returncode == 0, timed.stderr[-3000:]
    assert json.loads(timed.stdout.strip().splitlines()[-1])["flops_reduction"] > 1
    for args, fragment in [(["--variant=lp1.5"], "lp1.5"), (["--variant=c512x2"], "not smaller than the base"),
                           (["--prompt_len=100000"], "max_seq_len")]:
        result = entrypoint("ttft", *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]


@pytest.mark.slow
def test_a_kvp_run_built_on_a_base_that_trained_on_is_refused_not_reused(tmp_path):
    corpus = pydoc_corpus(tmp_path)
    common = [f"--config.data.source=files:{corpus}/*.txt", *MICRO, "--config.kvp.variants=('lp0.50',)"]
    workdir = tmp_path / "kvp"
    trained = entrypoint("train", f"--workdir={workdir}", *common)
    assert trained.returncode == 0, trained.stderr[-3000:]
    again = entrypoint("train", f"--workdir={workdir}", *common)  # nothing changed: every run is reused
    assert again.returncode == 0 and again.stdout.count("(finished,") == 3, again.stdout[-3000:]
    longer = entrypoint("train", f"--workdir={workdir}", *common, "--config.steps=8")  # the base trains on
    errors = [line for line in longer.stderr.splitlines() if line.startswith("error:")]
    assert longer.returncode == 2 and len(errors) == 1, longer.stderr[-3000:]
    assert "kvp_lp0.50 holds a checkpoint of a different setup (built_on:" in errors[0]
    assert "'step 6, loss" in errors[0] and "'step 8, loss" in errors[0] and "move the stale run away" in errors[0]


# KVPConfig's defaults: kvp_tiny's kvp.* section as the README's measurements were made with it (but variants and
# learning_rate)
TINY_KVP = dict(variants=("lp0.50", "lp0.25", "c96x2", "c64x2"), steps=500, learning_rate=1e-3,
                pretrain_canonical=True, lambda_base=1.0, lambda_aux=1.0, lambda_consistency=None, eval_questions=0,
                answer_tokens=8, eval_documents=32, prompt_tokens=64, continuation_tokens=32, ttft_prompt_len=256,
                ttft_batch=1, ttft_repeats=20, demo_only=False, base="")


def test_the_kvp_section_is_a_kvp_config_with_the_tiny_defaults_and_the_demo_overrides():
    from experiments.configs import kvp_tiny
    from experiments.kv_prediction.task import KVPConfig, kvp_config_from

    tiny = kvp_tiny.get_config()
    assert dataclasses.asdict(KVPConfig()) == TINY_KVP
    # kvp_tiny keeps every default but the auxiliaries (layer maps for its 4-layer base) and the KVP learning rate
    # (the base's): the config says why
    assert dataclasses.asdict(kvp_config_from(tiny)) == {**TINY_KVP, "variants": kvp_tiny.TINY_VARIANTS,
                                                         "learning_rate": tiny.optimizer.learning_rate}
    assert tiny.kvp.learning_rate == 3e-3
    assert kvp_tiny.TINY_VARIANTS == ("lp0.50@0,1,1,1", "lp0.25", "c96x2@0,1,1,1", "c64x2@0,1,1,1")
    assert sorted(tiny.kvp.keys()) == sorted(TINY_KVP)  # the section holds every field and nothing else
    demo = dict(variants=("lp0.50",), steps=30, learning_rate=3e-3, pretrain_canonical=False, ttft_repeats=3,
                eval_questions=16, demo_only=True, eval_documents=4)
    assert kvp_config_from(kvp_tiny.get_config("demo")) == KVPConfig(**demo)
    tiny.kvp.lambda_consistency = 0  # what --config.kvp.lambda_consistency=0 sets: the consistency term off
    assert kvp_config_from(tiny).lambda_consistency == 0.0
    assert KVPConfig(variants="c64x2").variants == ("c64x2",)  # one spec given as a string


def test_a_kvp_config_json_of_an_earlier_version_loads_with_the_missing_fields_defaulted(tmp_path):
    from experiments.configs import kvp_tiny
    from experiments.kv_prediction.pipeline import load_config
    from experiments.kv_prediction.task import CONFIG_FILE, KVPConfig, kvp_config_from

    values = kvp_tiny.get_config("demo").to_dict()
    del values["kvp"]["base"], values["kvp"]["demo_only"], values["kvp"]["ttft_batch"]  # not written back then
    (tmp_path / CONFIG_FILE).write_text(json.dumps(values))
    saved = kvp_config_from(kvp_tiny.get_config("demo"))
    assert kvp_config_from(load_config(tmp_path)) == dataclasses.replace(saved, demo_only=KVPConfig().demo_only)


def test_an_unknown_kvp_key_is_refused_naming_it():
    from experiments.configs import kvp_tiny
    from experiments.kv_prediction.task import kvp_config_from
    from lm_core.errors import UserError

    config = kvp_tiny.get_config()
    config.kvp.unlock()
    config.kvp.setps = 3
    with pytest.raises(UserError, match=r"^kvp has unknown field\(s\) \['setps'\]; valid: \[.*'steps'") as refused:
        kvp_config_from(config)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "kvp.steps=0 is invalid; valid: an integer >= 1"),
    ("steps", 2.5, "kvp.steps=2.5 is invalid; valid: an integer >= 1"),
    ("steps", True, "kvp.steps=True is invalid; valid: an integer >= 1"),
    ("eval_questions", -1, "kvp.eval_questions=-1 is invalid; valid: an integer >= 0 (0: every fact of the table"),
    ("answer_tokens", 0, "kvp.answer_tokens=0 is invalid; valid: an integer >= 1"),
    ("eval_documents", 0, "kvp.eval_documents=0 is invalid; valid: an integer >= 1"),
    ("prompt_tokens", 1, "kvp.prompt_tokens=1 is invalid; valid: an integer >= 2 (the auxiliary reads all but"),
    ("continuation_tokens", 0, "kvp.continuation_tokens=0 is invalid; valid: an integer >= 1"),
    ("ttft_prompt_len", 1, "kvp.ttft_prompt_len=1 is invalid; valid: an integer >= 2"),
    ("ttft_batch", 0, "kvp.ttft_batch=0 is invalid; valid: an integer >= 1"),
    ("ttft_repeats", -3, "kvp.ttft_repeats=-3 is invalid; valid: an integer >= 1"),
    ("learning_rate", 0.0, "kvp.learning_rate=0.0 is invalid; valid: a finite number > 0"),
    ("learning_rate", float("inf"), "kvp.learning_rate=inf is invalid; valid: a finite number > 0"),
    ("lambda_base", -0.5, "kvp.lambda_base=-0.5 is invalid; valid: a finite number >= 0"),
    ("lambda_aux", float("nan"), "kvp.lambda_aux=nan is invalid; valid: a finite number >= 0"),
    ("lambda_consistency", -1.0, "kvp.lambda_consistency=-1.0 is invalid; valid: a finite number >= 0 (0 turns the "
                                 "consistency loss off), or None for the paper's 1/n_base_layers"),
    ("lambda_consistency", float("nan"), "kvp.lambda_consistency=nan is invalid"),
    ("variants", (), "kvp.variants is empty; valid: a tuple of auxiliary specs, e.g. ('lp0.50', 'c64x2')"),
    ("variants", ("lp0.50", 3), "kvp.variants=('lp0.50', 3) is invalid; valid: a tuple of auxiliary specs"),
    ("pretrain_canonical", "yes", "kvp.pretrain_canonical='yes' is invalid; valid: True or False"),
    ("base", None, "kvp.base=None is invalid"),
])
def test_each_bad_kvp_value_is_one_line_naming_it_and_what_is_valid(field, value, message):
    from experiments.kv_prediction.task import KVPConfig
    from lm_core.errors import UserError

    with pytest.raises(UserError) as refused:
        KVPConfig(**{field: value})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_every_stage_checkpoints_at_the_configured_cadence_or_at_its_end():
    from experiments.configs import kvp_paper
    from experiments.kv_prediction.pipeline import stage_config

    config = kvp_paper.get_config()
    assert config.checkpoint_every == 1000
    # a 20,000-step KVP stage keeps the 1000-step cadence (it saved only at its end before: a crash lost it all)
    assert stage_config(config, 20_000).checkpoint_every == 1000
    assert stage_config(config, 300).checkpoint_every == 300  # shorter than the cadence: saved at its end
    assert stage_config(config, 20_000).eval_every == 20_000


def test_the_base_link_is_made_once_kept_when_right_and_refused_when_something_else_is_there(tmp_path):
    import ml_collections

    from experiments.kv_prediction.pipeline import link_pretrained_base
    from experiments.kv_prediction.task import base_dir
    from lm_core.errors import UserError

    (tmp_path / "pretrained").mkdir()
    config = ml_collections.ConfigDict({"kvp": {"base": str(tmp_path / "pretrained")}})
    for _ in range(2):  # made, then found right
        link_pretrained_base(config, tmp_path / "run")
        assert base_dir(tmp_path / "run").resolve() == tmp_path / "pretrained"
    (tmp_path / "other" / "base").mkdir(parents=True)
    with pytest.raises(UserError, match="is not a link to kvp.base="):
        link_pretrained_base(config, tmp_path / "other")
