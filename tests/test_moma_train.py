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
from lm_core.run_config import model_config_from
from lm_core.trainer import train

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
    from experiments.moma.task import moma_task

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
    from experiments.moma.task import load_moma, mixed_eval_batches, mixed_vocab_for
    from moma.depths import MoDBlock
    from moma.mixed_modal import modality_counts

    train_moma(tiny_moma_config("mod_moe_2x", vq_dir, steps=2), tmp_path / "run")
    model, config = load_moma(tmp_path / "run")
    assert config.moma.variant == "mod_moe_2x" and isinstance(model.blocks[0], MoDBlock)
    batches = mixed_eval_batches(tmp_path / "run")
    assert len(batches) == 1 and batches[0]["inputs"].shape == (8, 48)
    counts = modality_counts(batches[0]["targets"], batches[0]["loss_mask"], mixed_vocab_for(config))
    assert counts["image_tokens"].sum() > 0 and counts["text_tokens"].sum() > 0
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

    from experiments.moma.task import (
        load_moma,
        moma_task,
        read_run_config,
        seed_record,
        training_flops_per_token,
        upcycled_seed_flops,
    )
    from lm_core import sharding
    from lm_core.train_step import init_train_state

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
    parts = task.step(config)
    _, state, _ = init_train_state(parts.create_model, parts.optimizer, mesh, 0)
    upcycled = dict(nnx.to_flat_state(task.initialize(state).params))
    trained = dict(nnx.to_flat_state(nnx.state(load_moma(source_dir)[0], nnx.Param)))
    experts = [path for path, value in upcycled.items() if path in trained and trained[path].shape != value.shape]
    assert len(experts) == 2 * 2 * 4  # 2 layers x (text, image) x (gate, up, down, router)
    for path in experts:
        # the down projections are halved so that the 2 copies' outputs sum to the 1t1i FFN's (moma.upcycle)
        expected = np.broadcast_to(np.asarray(trained[path].get_value()), upcycled[path].shape)
        expected = expected / 2 if path[-1] == "down" else expected
        np.testing.assert_allclose(np.asarray(upcycled[path].get_value()), expected, rtol=1e-7)

    train(config, workdir, task)
    rows = read_metrics(workdir / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["learning_rate"] == source_rows[0]["learning_rate"]  # fresh warmup
    assert json.loads((workdir / "config.json").read_text())["moma"]["upcycle_from"] == str(source_dir)
    # stage 1's compute travels with the upcycled run: 3 seed steps of 8 x 48 tokens
    seed = json.loads((workdir / "upcycle_seed.json").read_text())
    assert seed == seed_record(source_dir) and (seed["seed_step"], seed["seed_tokens"]) == (3, 3 * 8 * 48)
    assert seed["seed_training_flops"] == 3 * 8 * 48 * training_flops_per_token(read_run_config(source_dir))
    assert upcycled_seed_flops(workdir) == seed["seed_training_flops"] and upcycled_seed_flops(source_dir) == 0.0
    (workdir / "upcycle_seed.json").unlink()  # a run upcycled before the record existed: read off the seed's dir
    assert upcycled_seed_flops(workdir) == seed["seed_training_flops"]


SYNTHETIC_TOKENS = [1000, 2000, 4000]
DENSE_CURVES = ([4.0, 3.0, 2.5], [3.0, 2.0, 1.5], [5.0, 4.0, 3.5])  # overall, text, image at SYNTHETIC_TOKENS


def write_synthetic_run(run_dir: Path, variant: str, curves: tuple[list[float], ...], upcycle_from: str = "",
                        eval_offset: float = 0.0) -> None:
    """A run directory as experiments.moma.train leaves it (config.json, metrics.jsonl), without training: the
    training and the evaluation losses follow `curves`, the evaluation's plus `eval_offset`."""
    config = moma_tiny.get_config(variant)
    config.moma.upcycle_from = upcycle_from
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "tokens": t, "loss": o, "text_loss": x, "image_loss": m,
                    "eval_loss": o + eval_offset, "eval_text_loss": x + eval_offset,
                    "eval_image_loss": m + eval_offset}) + "\n"
        for i, (t, o, x, m) in enumerate(zip(SYNTHETIC_TOKENS, *curves, strict=True))))


def test_savings_table_from_synthetic_metrics(tmp_path):
    from experiments.moma.savings import markdown_table, savings_rows, training_flops_per_token

    write_synthetic_run(tmp_path / "dense", "dense", DENSE_CURVES)
    # reaches dense's final overall loss 2.5 at the middle point: half the tokens
    write_synthetic_run(tmp_path / "moe_4t4i", "moe_4t4i", ([3.5, 2.5, 2.0], [3.0, 2.0, 1.5], [4.5, 3.5, 3.0]))
    rows = {row["variant"]: row for row in savings_rows(tmp_path, smooth=1)}
    assert rows["dense"]["eta"] == pytest.approx(1.0)
    ratio = training_flops_per_token(tmp_path / "dense") / training_flops_per_token(tmp_path / "moe_4t4i")
    assert rows["moe_4t4i"]["eta"] == pytest.approx(2.0 * ratio)
    assert rows["moe_4t4i"]["eta_text"] == pytest.approx(ratio)  # identical text curve: only the FLOPs differ
    # image: dense final 3.5 is reached at the middle point as well
    assert rows["moe_4t4i"]["eta_image"] == pytest.approx(2.0 * ratio)
    table = markdown_table(list(rows.values()))
    assert "| moe_4t4i |" in table and "η image" in table and "tokens/s" not in table


def test_eta_is_read_off_the_evaluation_curves_unless_the_training_curves_are_asked_for(tmp_path):
    from experiments.moma.savings import savings_rows, seed_noise, training_flops_per_token

    write_synthetic_run(tmp_path / "dense", "dense", DENSE_CURVES)
    # the same training curves as in the table test (dense's final 2.5 reached at the middle point), but every
    # evaluation 0.1 higher (3.6, 2.6, 2.1): it reaches dense's final evaluation 2.5 a fifth of the way (in loss)
    # from 2.6 at 2,000 tokens to 2.1 at 4,000, log-interpolated: at 2,000 x 2^0.2 tokens
    curves = ([3.5, 2.5, 2.0], [3.0, 2.0, 1.5], [4.5, 3.5, 3.0])
    write_synthetic_run(tmp_path / "moe_4t4i", "moe_4t4i", curves, eval_offset=0.1)
    ratio = training_flops_per_token(tmp_path / "dense") / training_flops_per_token(tmp_path / "moe_4t4i")
    by_eval = savings_rows(tmp_path, smooth=1)[1]
    assert by_eval["eta"] == pytest.approx(4000 / (2000 * 2 ** 0.2) * ratio)
    by_training = savings_rows(tmp_path, smooth=1, eta_curves="train")[1]
    assert by_training["eta"] == pytest.approx(2.0 * ratio)
    # the final losses in the row stay the training curve's either way; the last evaluation is reported as it is
    assert by_eval["final_loss"] == by_training["final_loss"] == 2.0 and by_eval["eval_loss"] == pytest.approx(2.1)
    # a second dense seed whose evaluations sit 0.5 above the first's (4.5, 3.5, 3.0) never reaches the first's
    # final 2.5; the first reaches the second's final 3.0 at 2,000 of 4,000 tokens: η 2, a bar of 1.0, read off
    # the evaluation curves too
    write_synthetic_run(tmp_path / "dense_seed1", "dense", DENSE_CURVES, eval_offset=0.5)
    rows = savings_rows(tmp_path, smooth=1)
    assert seed_noise(rows)["eta"] == pytest.approx(1.0)
    assert seed_noise(rows, eta_curves="train")["eta"] == pytest.approx(0.0)  # identical training curves


def test_upcycled_run_pays_for_its_seed_by_hand(tmp_path):
    from experiments.moma.savings import loss_curves, markdown_table, savings_rows, training_flops_per_token
    from lm_core.errors import UserError

    write_synthetic_run(tmp_path / "dense", "dense", DENSE_CURVES)
    up = tmp_path / "up_4t4i"
    write_synthetic_run(up, "moe_4t4i", ([3.0, 2.5, 2.0], [2.5, 1.75, 1.0], [4.5, 4.0, 3.6]),
                        upcycle_from=str(tmp_path / "gone" / "moe_1t1i"))
    with pytest.raises(UserError, match="which is gone, and holds no upcycle_seed.json"):
        savings_rows(tmp_path, smooth=1)
    f_dense, f_up = training_flops_per_token(tmp_path / "dense"), training_flops_per_token(up)
    seed = 2000 * f_up  # stage 1 cost what 2000 of the upcycled run's own tokens do
    (up / "upcycle_seed.json").write_text(json.dumps({"seed_training_flops": seed}))
    overall = loss_curves(up)["overall"][0]
    assert overall[0] == pytest.approx(seed + 1000 * f_up)  # the curve starts after the seed's compute

    row = savings_rows(tmp_path, smooth=1)[1]
    assert row["seed_training_flops"] == seed
    # overall: dense's final 2.5 at the middle point, C = seed + 2000 f_up = 4000 f_up (unshifted: 2000 f_up, 2x)
    assert row["eta"] == pytest.approx(4000 * f_dense / (4000 * f_up))
    # text: dense's final 1.5 a third of the way (in loss) from 1.75 at C = 4000 f_up to 1.0 at C = 6000 f_up,
    # log-interpolated in the shifted compute
    assert row["eta_text"] == pytest.approx(4000 * f_dense / (4000 * f_up * 1.5 ** (1 / 3)))
    assert row["eta_image"] is None  # 3.6 never reaches dense's 3.5
    assert "up_4t4i (moe_4t4i, upcycled, stage 1 counted)" in markdown_table(savings_rows(tmp_path, smooth=1))

    result = subprocess.run([sys.executable, "-m", "experiments.moma.savings", f"--workdir={tmp_path}", "--json",
                             "--throughput_steps=0", "--smooth=1"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    for printed_row in printed:
        assert {"variant", "eta", "eta_text", "eta_image", "throughput_vs_dense", "final_loss", "final_text_loss",
                "final_image_loss"} <= set(printed_row)
        assert printed_row["throughput_vs_dense"] is None  # not measured with --throughput_steps=0
    assert [r["variant"] for r in printed] == ["dense", "moe_4t4i"]
    assert printed[1]["eta"] == pytest.approx(row["eta"]) and printed[1]["final_text_loss"] == 1.0


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
