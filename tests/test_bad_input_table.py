"""Bad input through every kind of entrypoint and benchmark: exit code 2, ONE `error:` line naming the bad value,
and nothing written (no new files, no temporary files left, an existing workdir byte-identical)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER_CSV = REPO / "vocab_scaling" / "data" / "vocab_paper_exp_data.csv"

# (name, module, arguments with {tmp} for the test's directory, a fragment the error line must contain)
CASES = [
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
]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes and every directory (a created, even empty, workdir counts as written)."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize(("name", "module", "arguments", "fragment"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, module, arguments, fragment, tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    before = snapshot(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if name == "bad process count":
        env.update(LM_CORE_NUM_PROCESSES="two", LM_CORE_PROCESS_ID="0", LM_CORE_COORDINATOR="localhost:1")
    done = subprocess.run([sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in arguments)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and fragment in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert snapshot(tmp_path) == before  # nothing new, nothing changed, no temporary file left
