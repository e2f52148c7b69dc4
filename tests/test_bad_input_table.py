"""Bad input through every kind of entrypoint and benchmark: exit code 2, ONE `error:` line naming the bad value,
and nothing written (no new files, no temporary files left, an existing workdir byte-identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER_CSV = REPO / "vocab_scaling" / "data" / "vocab_paper_exp_data.csv"
MOMA_CONFIG = REPO / "experiments" / "configs" / "moma_tiny.py"
# the demo's small data, and an image tokenizer dir inside the test's directory (a default one is a shared cache)
MOMA_DEMO = [f"--config={MOMA_CONFIG}:demo", "--config.moma.image_tokenizer.dir={tmp}/vq"]

# (name, module, arguments with {tmp} for the test's directory, a fragment the error line must contain)
CASES = [
    ("URL workdir", "experiments.train_lm", ["--workdir=gs://bucket/run"],
     "--workdir=gs://bucket/run: URL paths are not supported"),
    ("URL prepared-data output", "experiments.prepare_data", ["--source=builtin", "--tokenizer=byte",
                                                              "--out=s3://bucket/tokens"],
     "--out=s3://bucket/tokens: URL paths are not supported"),
    ("unknown override", "experiments.train_lm", ["--workdir={tmp}/w", "--config.nonexistent=1"],
     "--config.nonexistent: no such field"),
    ("missing config file", "experiments.train_lm", ["--workdir={tmp}/w", "--config={tmp}/missing.py"],
     "missing.py"),
    ("config with a syntax error", "experiments.train_lm", ["--workdir={tmp}/w", "--config={tmp}/broken.py"],
     "invalid syntax (broken.py"),
    ("override of the wrong type", "experiments.train_lm", ["--workdir={tmp}/w", "--config.steps=abc"],
     "--config.steps=abc"),
    ("unknown sweep field", "experiments.vocab_scaling.sweep", ["--workdir={tmp}/w", "--config.sweep.nothing=1"],
     "--config.sweep.nothing"),
    ("unknown kvp field", "experiments.kv_prediction.train", ["--workdir={tmp}/w", "--config.kvp.nope=2"],
     "--config.kvp.nope"),
    ("zero KVP steps", "experiments.kv_prediction.train", ["--workdir={tmp}/w", "--config.kvp.steps=0"],
     "kvp.steps=0 is invalid; valid: an integer >= 1"),
    ("corrupt config.json", "experiments.sample", ["--workdir={tmp}/corrupt"], "config.json is not readable JSON"),
    ("a predicted V past the f(V) cap", "experiments.vocab_scaling.predict", ["--nnv=1e15"], "past 200,000"),
    ("a binary CSV", "experiments.vocab_scaling.fit", ["--csv={tmp}/binary.csv", "--form=vocab"],
     "binary.csv' is not a text CSV file"),
    ("--out under a file", "experiments.vocab_scaling.fit",
     [f"--csv={PAPER_CSV}", "--form=vocab", "--out={tmp}/a_file/fit.json"], "cannot write"),
    ("a mistyped KVP workdir", "experiments.kv_prediction.ttft", ["--workdir={tmp}/typo"], "typo does not exist"),
    ("export of no run", "experiments.export_hf", ["--workdir={tmp}/none", "--out={tmp}/hf"], "holds no checkpoints"),
    ("import of no model", "experiments.import_hf", ["--hf_dir={tmp}/none", "--workdir={tmp}/w"], "config.json"),
    ("bad process count", "experiments.sample", ["--workdir={tmp}/corrupt"], "LM_CORE_NUM_PROCESSES='two'"),
    ("negative benchmark steps", "benchmarks.train_step", ["--steps=-1"], "--steps: -1 must be >= 1"),
    ("zero vocabulary", "benchmarks.large_vocab", ["--vocab=0"], "--vocab: 0 must be >= 1"),
    ("non-numeric prompt lengths", "benchmarks.ttft", ["--prompt_lens=abc"], "--prompt_lens: 'abc'"),
    ("zero decode tokens", "benchmarks.decode", ["--new_tokens=0"], "--new_tokens: 0 must be >= 1"),
    ("zero data batches", "benchmarks.data", ["--batches=0"], "--batches: 0 must be >= 1"),
    ("data benchmark on no prepared dataset", "benchmarks.data", ["--prepared={tmp}/corrupt"],
     "tokens:{tmp}/corrupt has no manifest.json"),
    ("negative seed", "experiments.train_lm", ["--workdir={tmp}/w", "--config.seed=-1"], "seed=-1"),
    # MoMa: the run fixtures are config.json files only (moma_runs below); every case fails before any training
    ("unknown MoMa config variant", "experiments.moma.train",
     ["--workdir={tmp}/w", f"--config={MOMA_CONFIG}:nonsense"], "unknown MoMa variant 'nonsense'"),
    ("unknown moma field", "experiments.moma.train", ["--workdir={tmp}/w", "--config.moma.nope=1"],
     "--config.moma.nope: no such field"),
    ("NaN capacity factor", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.capacity_factor=nan"],
     "moma.capacity_factor=nan must be a finite number"),
    ("negative MoD capacity", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.variant=mod_moe_2t2i", "--config.moma.mod_capacity=-0.5"],
     "mod_capacity=-0.5 must be in (0, 1]"),
    ("image source with a bad prefix", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.image_source=picture:x"], "unknown image source 'picture:x'"),
    ("negative MoMa seed", "experiments.moma.train", ["--workdir={tmp}/w", *MOMA_DEMO, "--config.seed=-1"],
     "seed=-1 must be an integer >= 0"),
    ("negative image tokenizer seed", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.image_tokenizer.seed=-1"], "moma.image_tokenizer.seed=-1"),
    ("upcycling from a missing dir", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.upcycle_from={tmp}/gone"],
     "moma.upcycle_from={tmp}/gone: {tmp}/gone has no config.json"),
    ("upcycling from a non-1t1i run", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.upcycle_from={tmp}/moma_runs/moe_2t2i"],
     "moma.upcycle_from={tmp}/moma_runs/moe_2t2i: upcycling starts from a moe_1t1i model, not 'moe_2t2i'"),
    ("upcycling from a corrupt run", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.upcycle_from={tmp}/corrupt"], "config.json is not readable JSON"),
    ("upcycling from an untrained run", "experiments.moma.train",
     ["--workdir={tmp}/w", *MOMA_DEMO, "--config.moma.upcycle_from={tmp}/moma_1t1i"], "it holds no checkpoint yet"),
    ("savings of a missing dir", "experiments.moma.savings", ["--workdir={tmp}/gone"], "gone does not exist"),
    ("savings without a dense run", "experiments.moma.savings", ["--workdir={tmp}/moma_runs"],
     "holds 0 dense MoMa runs [] among ['moe_2t2i']"),
    ("savings over a corrupt config.json", "experiments.moma.savings", ["--workdir={tmp}"],
     "corrupt/config.json is not readable JSON"),
    ("savings off unknown curves", "experiments.moma.savings", ["--workdir={tmp}", "--eta_curves=smoothed"],
     "--eta_curves=smoothed: value should be one of <train|eval>"),
    ("image tokenizer with a bad source prefix", "experiments.moma.train_image_tokenizer",
     ["--workdir={tmp}/w", "--source=picture:x"], "unknown image source 'picture:x'"),
    ("image tokenizer with a negative seed", "experiments.moma.train_image_tokenizer",
     ["--workdir={tmp}/w", "--seed=-1"], "--seed=-1"),
    ("image tokenizer into a file", "experiments.moma.train_image_tokenizer", ["--workdir={tmp}/a_file/vq"],
     "a_file is a file"),
    ("aux routers of no MoMa run", "experiments.moma.train_aux_routers", ["--workdir={tmp}/kvp"],
     "kvp has no config.json"),
    ("aux routers of a corrupt run", "experiments.moma.train_aux_routers", ["--workdir={tmp}/corrupt"],
     "config.json is not readable JSON"),
    ("aux routers of a 1t1i run", "experiments.moma.train_aux_routers", ["--workdir={tmp}/moma_1t1i"],
     "'moe_1t1i' makes no routing decision"),
    ("aux routers of an untrained run", "experiments.moma.train_aux_routers",
     ["--workdir={tmp}/moma_runs/moe_2t2i"],
     "moma_runs/moe_2t2i is not trained yet ({tmp}/moma_runs/moe_2t2i/checkpoints is missing)"),
    ("NaN causal capacity", "experiments.moma.train_aux_routers",
     ["--workdir={tmp}/moma_runs/moe_2t2i", "--causal_capacity=nan"], "causal_capacity=nan"),
    ("KVP evaluation of a MoMa run", "experiments.kv_prediction.evaluate", ["--workdir={tmp}/moma_1t1i"],
     "moma_1t1i has no kvp_config.json"),
    ("KVP evaluation of a corrupt config", "experiments.kv_prediction.evaluate", ["--workdir={tmp}/kvp_corrupt"],
     "kvp_config.json is not a readable KV-prediction config"),
    ("KVP evaluation before training", "experiments.kv_prediction.evaluate", ["--workdir={tmp}/kvp"],
     "kvp/base is not trained yet"),
]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes and every directory (a created, even empty, workdir counts as written)."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


def write_run_fixtures(tmp_path: Path) -> None:
    """Runs as their config files leave them, never trained: a moe_1t1i run and, among moma_runs/, a moe_2t2i run
    with metrics (a directory of runs without a dense one); a KVP pipeline's saved config, and a corrupt one."""
    from experiments.configs import kvp_tiny, moma_tiny

    for path, variant in ((tmp_path / "moma_1t1i", "moe_1t1i"), (tmp_path / "moma_runs" / "moe_2t2i", "moe_2t2i")):
        config = moma_tiny.get_config("demo")
        config.moma.variant = variant
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "moma_runs" / "moe_2t2i" / "metrics.jsonl").write_text('{"step": 1, "tokens": 512, "loss": 5.0}\n')
    (tmp_path / "kvp").mkdir()
    (tmp_path / "kvp" / "kvp_config.json").write_text(json.dumps(kvp_tiny.get_config().to_dict(), default=str))
    (tmp_path / "kvp_corrupt").mkdir()
    (tmp_path / "kvp_corrupt" / "kvp_config.json").write_text('{"kvp": ')


@pytest.mark.parametrize(("name", "module", "arguments", "fragment"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, module, arguments, fragment, tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    write_run_fixtures(tmp_path)
    before = snapshot(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if name == "bad process count":
        env.update(LM_CORE_NUM_PROCESSES="two", LM_CORE_PROCESS_ID="0", LM_CORE_COORDINATOR="localhost:1")
    done = subprocess.run([sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in arguments)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and fragment.format(tmp=tmp_path) in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert snapshot(tmp_path) == before  # nothing new, nothing changed, no temporary file left
