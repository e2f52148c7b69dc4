"""The trainer as a user meets it: kill -9 and SIGTERM resume exactly, bad input fails cleanly, meshes agree.

Each run is a real `python -m experiments.train_lm` subprocess on a tiny model over a small `files:` corpus.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lm_core.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.vocab_size=264", "--config.model.d_model=32", "--config.model.num_layers=2",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.d_ff=64",
    "--config.model.max_seq_len=64", "--config.data.tokenizer=byte", "--config.data.seq_len=32",
    "--config.data.global_batch_size=8", "--config.log_every=1", "--config.eval_every=0",
    "--config.optimizer.warmup_steps=2", "--config.optimizer.total_steps=24",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in sorted(pydoc_data.topics.topics.items())[:24]:
        (folder / f"{name}.txt").write_text(text)
    return f"files:{folder}/*.txt"


def command(workdir: Path, corpus: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train_lm", f"--workdir={workdir}", f"--config.data.source={corpus}",
            *TINY, *extra]


def environment(devices: int = 1) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONUNBUFFERED="1")


def train(workdir: Path, corpus: str, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, corpus, *extra), cwd=REPO, env=environment(devices),
                          capture_output=True, text=True, timeout=300)


def losses(workdir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(workdir / "metrics.jsonl")]


def final_params(workdir: Path) -> list[np.ndarray]:
    import jax
    from flax import nnx

    from lm_core.trained_runs import load_trained_model

    model, _, _ = load_trained_model(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


STEPS = ["--config.steps=24", "--config.checkpoint_every=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    result = train(workdir, corpus, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(losses(workdir)) == 24
    return workdir


def wait_for_steps(workdir: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(losses(workdir)) < count:
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "training did not reach the step to interrupt at"
        time.sleep(0.05)


def test_kill_9_then_rerun_is_identical_to_an_uninterrupted_run(tmp_path, corpus, reference):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(workdir, corpus, *STEPS), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_steps(workdir, random.Random().randint(5, 14), proc)
    time.sleep(random.Random().uniform(0, 0.3))  # somewhere inside a step, a log write or a checkpoint save
    proc.kill()
    proc.wait()
    result = train(workdir, corpus, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(workdir) == losses(reference)
    for resumed, uninterrupted in zip(final_params(workdir), final_params(reference), strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)


def test_sigterm_saves_exits_and_resumes_exactly(tmp_path, corpus, reference):
    workdir = tmp_path / "terminated"
    proc = subprocess.Popen(command(workdir, corpus, *STEPS), cwd=REPO, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(workdir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "received SIGTERM: saved checkpoint at step" in out
    saved_step = int(out.split("saved checkpoint at step ")[1].split()[0])
    assert (workdir / "checkpoints" / str(saved_step)).is_dir()
    assert saved_step < 24
    result = train(workdir, corpus, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(workdir) == losses(reference)
    # the tokens and characters seen count from the run's start across the resume (a sweep's FLOPs axis)
    seen = [(row["step"], row["tokens"], row["chars"]) for row in read_metrics(workdir / "metrics.jsonl")]
    assert seen == [(row["step"], row["tokens"], row["chars"]) for row in read_metrics(reference / "metrics.jsonl")]


def test_one_and_eight_devices_log_the_same_losses_and_checkpoints_move_between_meshes(tmp_path, corpus,
                                                                                         reference):
    workdir = tmp_path / "sharded"
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    first = train(workdir, corpus, "--config.steps=8", "--config.checkpoint_every=4", *mesh, devices=8)
    assert first.returncode == 0, first.stderr[-2000:]
    # continue the 8-device checkpoint on 1 device, then back on 8 devices
    second = train(workdir, corpus, "--config.steps=16", "--config.checkpoint_every=4", devices=1)
    assert second.returncode == 0, second.stderr[-2000:]
    third = train(workdir, corpus, *STEPS, *mesh, devices=8)
    assert third.returncode == 0, third.stderr[-2000:]
    np.testing.assert_allclose(losses(workdir), losses(reference), rtol=2e-4)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, corpus, reference):
    fresh = tmp_path / "fresh"
    assert_clean_failure(train(fresh, corpus, "--config.model.num_heads=3"), "num_heads=3")
    assert_clean_failure(train(fresh, corpus, "--config.steps=-5"), "steps=-5")
    assert_clean_failure(train(fresh, corpus, "--config.optimizer.learning_rate=fast"), "learning_rate")
    assert_clean_failure(train(fresh, corpus, "--config.z_loss=nan"), "z_loss=nan", "finite")
    assert_clean_failure(train(fresh, corpus, "--config.mesh.data=3"), "needs 3 devices")
    assert_clean_failure(train(fresh, f"files:{tmp_path}/missing/*.txt"), "matches no files")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert_clean_failure(train(fresh, f"files:{empty}/*.txt"), str(empty))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "good.txt").write_text("hello world " * 50)
    (binary / "bad.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    assert_clean_failure(train(fresh, f"files:{binary}/*.txt"), "bad.txt")
    assert not fresh.exists()

    before = snapshot(reference)
    assert_clean_failure(train(reference, corpus, *STEPS, "--config.model.d_model=48"), "d_model", "48")
    assert snapshot(reference) == before


def test_corrupted_checkpoint_is_named_not_replaced(tmp_path, corpus):
    workdir = tmp_path / "corrupt"
    assert train(workdir, corpus, "--config.steps=4", "--config.checkpoint_every=4").returncode == 0
    for path in (workdir / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.name != "_CHECKPOINT_METADATA":
            path.write_bytes(b"garbage")
    result = train(workdir, corpus, "--config.steps=8", "--config.checkpoint_every=4")
    assert_clean_failure(result, str(workdir / "checkpoints" / "4"))
    assert not (workdir / "checkpoints" / "8").exists()


def test_a_diverging_run_stops_in_one_line_and_its_newest_checkpoint_is_finite(tmp_path, corpus):
    workdir = tmp_path / "diverged"
    result = train(workdir, corpus, "--config.steps=40", "--config.checkpoint_every=5",
                   "--config.optimizer.learning_rate=1e4", "--config.optimizer.grad_clip=0",
                   "--config.optimizer.warmup_steps=0")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), result.stderr[-2000:]
    step = int(lines[0].split("at step ")[1].split(":")[0])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == step - 1 < 40  # the state before the step that diverged, saved when it did
    assert str(workdir / "checkpoints" / str(step - 1)) in lines[0]
    config = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == 40
    assert all(np.all(np.isfinite(p)) for p in final_params(workdir))
    # the same command diverges again at the same step: the rerun starts from that state and retries that batch
    again = train(workdir, corpus, "--config.steps=40", "--config.checkpoint_every=5",
                  "--config.optimizer.learning_rate=1e4", "--config.optimizer.grad_clip=0",
                  "--config.optimizer.warmup_steps=0")
    assert again.returncode == 1 and f"at step {step}:" in again.stderr, again.stderr[-2000:]


def test_a_checkpoint_path_that_is_a_file_fails_before_the_first_step(tmp_path, corpus):
    workdir = tmp_path / "blocked"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    result = train(workdir, corpus, "--config.steps=8", "--config.checkpoint_every=4")
    assert_clean_failure(result, str(workdir / "checkpoints"), "not a directory")
    # no step ran (it used to train every step, then hang ~300 s inside Orbax): proven by what is logged, not timed
    assert not (workdir / "metrics.jsonl").exists() or not losses(workdir)
