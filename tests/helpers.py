"""Small shared fixtures-as-functions for the tests."""

from __future__ import annotations

import dataclasses
import json
import pydoc_data.topics
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lm_core.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> ModelConfig:
    """8 query heads over 4 KV heads (GQA), every size divisible by the test meshes' axes."""
    base = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=128, max_seq_len=64)
    base.update(changes)
    return ModelConfig(**base)


def random_batch(seed: int, batch: int = 8, seq: int = 16, vocab: int = 128, packed: bool = False
                 ) -> dict[str, np.ndarray]:
    """A next-token batch; with packed=True each row holds two documents (segment ids 1 and 2)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
    if packed:
        split = seq // 3
        segments = np.where(np.arange(seq) < split, 1, 2).astype(np.int32)
        out["segment_ids"] = np.broadcast_to(segments, (batch, seq)).copy()
        positions = np.where(np.arange(seq) < split, np.arange(seq), np.arange(seq) - split).astype(np.int32)
        out["positions"] = np.broadcast_to(positions, (batch, seq)).copy()
        out["loss_mask"][:, split - 1] = 0.0  # the last token of document 1 has no target inside its document
    return out


def tiny_run(tmp_path: Path, **changes):
    """A 1-layer byte-level model on a small `files:` corpus (tmp_path/corpus): a step takes milliseconds after
    compilation; `changes` override top-level config fields."""
    from lm_core.run_config import default_config

    config = default_config()
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for index in range(24):
        (corpus / f"{index}.txt").write_text(f"document {index}: " + "the quick brown fox jumps over it. " * 40)
    config.data.update(source=f"files:{corpus}/*.txt", tokenizer="byte", seq_len=32, global_batch_size=8)
    config.model.update(vocab_size=264, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                        max_seq_len=64)
    config.update(steps=8, log_every=1, eval_every=0, checkpoint_every=3)
    config.optimizer.update(warmup_steps=2, total_steps=8)
    config.update(changes)
    return config


ROOT = Path(__file__).resolve().parents[1]


def sweep_config_text(source: str, **sweep) -> str:
    """A vocabulary-sweep config file for tiny runs on `source` (seq 32, batch 8); `sweep`: its `sweep` section."""
    return f"""
import ml_collections
from lm_core.run_config import default_config

def get_config():
    config = default_config()
    config.data.source = {source!r}
    config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.log_every = 5
    config.sweep = ml_collections.ConfigDict({sweep!r})
    return config
"""


def check_resume_is_exact(make_loader: Callable[[], Any], steps: int, save_at: int) -> Any:
    """Run a fresh loader `steps` batches, saving its state (through JSON, as a checkpoint does) before batch
    `save_at`; a second fresh loader restored from it must give the same batches from there. Returns the first."""
    loader = make_loader()
    batches, saved = [], None
    for step in range(steps):
        if step == save_at:
            saved = json.loads(json.dumps(loader.state()))  # it must survive JSON
        batches.append(loader.next())
    resumed = make_loader()
    resumed.restore(saved)
    for expected in batches[save_at:]:
        assert_batches_equal(resumed.next(), expected)
    return loader


def assert_batches_equal(a: dict, b: dict) -> None:
    """Two host batches are the same: the loader keys (no per-modality counts: nothing on the device reads
    them), dtypes and values."""
    from lm_core.data import BATCH_KEYS

    assert a.keys() == b.keys() == set(BATCH_KEYS)
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def task_with_loss(loss_fn, **changes):
    """A plain LM TrainTask whose train step uses `loss_fn` (changes: the task's other members)."""
    from lm_core.task import TrainTask, lm_step_parts

    return TrainTask(step=lambda config: dataclasses.replace(lm_step_parts(config), loss_fn=loss_fn), **changes)


def pydoc_corpus(directory: Path, documents: int) -> Path:
    """A small text corpus from the standard library's pydoc topics (no download): `documents` .txt files."""
    directory.mkdir()
    for name, text in sorted(pydoc_data.topics.topics.items())[:documents]:
        (directory / f"{name}.txt").write_text(text)
    return directory


def step_line_after(marker: str) -> Callable[[list[str]], bool]:
    """A `run_cli` stop condition: the newest output line is a training progress line ("step 5/40 | ...") and an
    earlier line contained `marker` (e.g. "== run 2 of"), i.e. that run is inside its step loop."""

    def reached(lines: list[str]) -> bool:
        return lines[-1].startswith("step ") and any(marker in line for line in lines)

    return reached


def run_cli(command: list[str], env: dict[str, str], stop_when: Callable[[list[str]], bool] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` run from the repository root, stdout and stderr merged into `.stdout`; with `stop_when`, SIGTERM
    is sent once (the first time it holds for the lines printed so far), as a scheduler preempting the job would.
    A child still running after `timeout` seconds is killed, so a hung pipeline fails the test instead of hanging."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if stop_when is not None and stop_when(lines):
                process.send_signal(signal.SIGTERM)
                stop_when = None
        process.wait()
    finally:
        watchdog.cancel()
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def moma_micro_flags(vq_dir: Path, variant: str, steps: int, *extra: str) -> list[str]:
    """A seconds-sized run: one layer, byte captions, 8x8 images -> 4x4 codes of a 16-code VQ trained for 3 steps.
    optimizer.total_steps is fixed so that a run trained on compiles to the same step (a cache hit)."""
    return [f"--config={REPO}/experiments/configs/moma_tiny.py:demo", f"--config.moma.variant={variant}",
            "--config.model.vocab_size=288", "--config.model.d_model=32", "--config.model.num_layers=1",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.d_ff=64",
            "--config.model.max_seq_len=64", "--config.data.tokenizer=byte", "--config.data.seq_len=48",
            "--config.data.global_batch_size=8", f"--config.steps={steps}", "--config.log_every=1",
            "--config.eval_every=0", "--config.checkpoint_every=2", "--config.optimizer.warmup_steps=1",
            "--config.optimizer.total_steps=4", "--config.moma.image_source=builtin:64",
            f"--config.moma.image_tokenizer.dir={vq_dir}", "--config.moma.image_tokenizer.image_size=8",
            "--config.moma.image_tokenizer.downsample=2", "--config.moma.image_tokenizer.widths=(8,)",
            "--config.moma.image_tokenizer.codebook_size=16", "--config.moma.image_tokenizer.code_dim=8",
            "--config.moma.image_tokenizer.steps=3", "--config.moma.image_tokenizer.batch_size=8", *extra]
