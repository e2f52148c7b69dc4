"""MoMa training entrypoints: experiments.moma.train (resume, bad input, upcycling) and experiments.moma.savings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.configs import moma_tiny
from lm_core.checkpoint import Checkpointer
from lm_core.metrics import read_metrics
from lm_core.trainer import model_config_from, train

REPO = Path(__file__).resolve().parents[1]


def tiny_moma_config(variant: str, vq_dir: Path, steps: int = 4):
    """A seconds-sized run: byte captions, 8x8 images -> 4x4 codes of a 16-code VQ trained for 3 steps."""
    config = moma_tiny.get_config("demo")
    config.moma.variant = variant
    config.model.update(dict(vocab_size=288, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64,
                             max_seq_len=64))
    config.data.update(dict(tokenizer="byte", seq_len=48, global_batch_size=8))
    config.steps, config.log_every, config.eval_every, config.eval_batches = steps, 1, 2, 1
    config.checkpoint_every = 2
    config.optimizer.warmup_steps = 2
    config.moma.image_source = "builtin:64"
    config.moma.image_tokenizer.update(dict(dir=str(vq_dir), image_size=8, downsample=2, widths=(8,),
                                            codebook_size=16, code_dim=8, steps=3, batch_size=8))
    return config


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moma") / "image_tokenizer"  # trained by the first run, shared by the rest


def train_moma(config, workdir: Path):
    from experiments.moma.train import moma_task

    return train(config, workdir, moma_task(config, workdir))


def expert_parallel(config):
    """The two experts of each group on different devices of the 8-device test mesh."""
    config.mesh.update(dict(data=4, expert=2))
    return config


@pytest.mark.slow
def test_train_logs_per_modality_losses_and_resumes_exactly(tmp_path, vq_dir):
    straight = train_moma(expert_parallel(tiny_moma_config("moe_2t2i", vq_dir)), tmp_path / "straight")
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for key in ("loss", "text_loss", "image_loss"):
        assert all(math.isfinite(row[key]) for row in rows)
    last = rows[-1]
    assert {"eval_loss", "eval_text_loss", "eval_image_loss"} <= set(last) and "eval_bpc" not in last
    # the overall eval loss is the token-weighted mean of the two modalities' losses
    mixed = last["eval_text_share"] * last["eval_text_loss"] + last["eval_image_share"] * last["eval_image_loss"]
    assert mixed == pytest.approx(last["eval_loss"], rel=1e-5)
    assert (vq_dir / "reconstructions.png").exists() and (vq_dir / "pairs").is_dir()

    interrupted = tmp_path / "interrupted"
    train_moma(expert_parallel(tiny_moma_config("moe_2t2i", vq_dir, steps=2)), interrupted)
    resumed = train_moma(expert_parallel(tiny_moma_config("moe_2t2i", vq_dir, steps=4)), interrupted)
    assert resumed.step == straight.step == 4
    again = read_metrics(interrupted / "metrics.jsonl")
    for key in ("loss", "text_loss", "image_loss", "learning_rate"):
        assert [row[key] for row in again] == [row[key] for row in rows], key


@pytest.mark.slow
def test_load_moma_and_eval_batches_of_a_run(tmp_path, vq_dir):
    from experiments.moma.train import load_moma, mixed_eval_batches
    from moma.depths import MoDBlock

    train_moma(tiny_moma_config("mod_moe_2x", vq_dir, steps=2), tmp_path / "run")
    model, config = load_moma(tmp_path / "run")
    assert config.moma.variant == "mod_moe_2x" and isinstance(model.blocks[0], MoDBlock)
    batches = mixed_eval_batches(tmp_path / "run")
    assert len(batches) == 1 and batches[0]["inputs"].shape == (8, 48)
    assert batches[0]["image_tokens"].sum() > 0 and batches[0]["text_tokens"].sum() > 0
    logits = model(batches[0]["inputs"], positions=batches[0]["positions"],
                   segment_ids=batches[0]["segment_ids"]).logits
    assert logits.shape == (8, 48, 288) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_dense_and_moe_1t1i_smoke(tmp_path, vq_dir):
    results = {v: train_moma(tiny_moma_config(v, vq_dir, steps=2), tmp_path / v) for v in ("dense", "moe_1t1i")}
    for variant, result in results.items():
        assert math.isfinite(result.last_metrics["eval_image_loss"]), variant
    # the same data and the same initial embedding: both start from about ln(vocab)
    first = {v: read_metrics(tmp_path / v / "metrics.jsonl")[0]["loss"] for v in results}
    assert first["dense"] == pytest.approx(first["moe_1t1i"], abs=0.2)
    assert abs(first["dense"] - math.log(288)) < 1.0


@pytest.mark.slow
def test_upcycling_keeps_the_data_position_and_resets_the_schedule(tmp_path, vq_dir):
    from flax import nnx

    from experiments.moma.train import load_moma, moma_task
    from lm_core import sharding
    from lm_core.optim import make_optimizer
    from lm_core.train_step import init_train_state
    from lm_core.trainer import optimizer_config_from

    source_dir = tmp_path / "moe_1t1i"
    train_moma(tiny_moma_config("moe_1t1i", vq_dir, steps=3), source_dir)
    source_rows = read_metrics(source_dir / "metrics.jsonl")
    checkpoints = Checkpointer(source_dir / "checkpoints")
    source_position = checkpoints.read_data(checkpoints.latest_step())
    checkpoints.close()

    config = tiny_moma_config("moe_2t2i", vq_dir, steps=2)
    config.moma.upcycle_from = str(source_dir)
    workdir = tmp_path / "upcycled"
    task = moma_task(config, workdir)
    data = task.make_data(config, workdir, model_config_from(config))
    assert data.loader.state() == source_position and source_position["document"] > 0
    # every expert of the fresh state starts as the 1t1i run's FFN of its modality
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    optimizer = make_optimizer(optimizer_config_from(config))
    _, state, _ = init_train_state(lambda: task.create_model(model_config_from(config), 0), optimizer, mesh, 0)
    upcycled = dict(nnx.to_flat_state(task.initialize(state).params))
    trained = dict(nnx.to_flat_state(nnx.state(load_moma(source_dir)[0], nnx.Param)))
    experts = [path for path, value in upcycled.items() if path in trained and trained[path].shape != value.shape]
    assert len(experts) == 2 * 2 * 3  # 2 layers x (text, image) x (gate, up, down)
    for path in experts:
        expected = np.broadcast_to(np.asarray(trained[path].get_value()), upcycled[path].shape)
        np.testing.assert_array_equal(np.asarray(upcycled[path].get_value()), expected)

    train(config, workdir, task)
    rows = read_metrics(workdir / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["learning_rate"] == source_rows[0]["learning_rate"]  # fresh warmup
    assert json.loads((workdir / "config.json").read_text())["moma"]["upcycle_from"] == str(source_dir)


def test_savings_table_from_synthetic_metrics(tmp_path):
    from experiments.moma.savings import markdown_table, savings_rows, training_flops_per_token

    tokens = [1000, 2000, 4000]
    curves = {"dense": ([4.0, 3.0, 2.5], [3.0, 2.0, 1.5], [5.0, 4.0, 3.5]),
              # reaches dense's final overall loss 2.5 at the middle point: half the tokens
              "moe_4t4i": ([3.5, 2.5, 2.0], [3.0, 2.0, 1.5], [4.5, 3.5, 3.0])}
    for variant, (overall, text, image) in curves.items():
        run_dir = tmp_path / variant
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(moma_tiny.get_config(variant).to_dict()))
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "tokens": t, "loss": o, "text_loss": x, "image_loss": m}) + "\n"
            for i, (t, o, x, m) in enumerate(zip(tokens, overall, text, image, strict=True))))
    rows = {row["variant"]: row for row in savings_rows(tmp_path, smooth=1)}
    assert rows["dense"]["eta_overall"] == pytest.approx(1.0)
    ratio = training_flops_per_token(tmp_path / "dense") / training_flops_per_token(tmp_path / "moe_4t4i")
    assert rows["moe_4t4i"]["eta_overall"] == pytest.approx(2.0 * ratio)
    assert rows["moe_4t4i"]["eta_text"] == pytest.approx(ratio)  # identical text curve: only the FLOPs differ
    # image: dense final 3.5 is reached at the middle point as well
    assert rows["moe_4t4i"]["eta_image"] == pytest.approx(2.0 * ratio)
    table = markdown_table(list(rows.values()))
    assert "| moe_4t4i |" in table and "η image" in table and "tokens/s" not in table


def run_entrypoint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.moma.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    config = f"--config={REPO}/experiments/configs/moma_tiny.py:demo"
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "broken.png").write_bytes(b"not a png")
    cases = {"--config.moma.variant=moe_3q": "unknown MoMa variant 'moe_3q'",
             "--config.mesh.expert=8": "does not fit the mesh's expert axis of size 8",
             "--config.moma.capacity_factor=0": "capacity_factor=0.0 must be > 0",
             f"--config.moma.image_source=images:{no_images}": "has no readable image",
             "--config.moma.routing_groups=3": "routing_groups=3 does not split a batch of 8 rows",
             "--config.moma.routing_groups=8 --config.moma.max_text_fraction=0.05":
                 "text experts get 0.80 < 1 slot each: 8 routing groups of 64 tokens"}
    for flags, message in cases.items():
        result = run_entrypoint(config, f"--workdir={workdir}", *flags.split())
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (flags, result.stderr)
        assert not workdir.exists()
