"""moma.vq: the VQ image tokenizer (shapes, EMA codebook formulas, training, determinism, save/load) and its
entrypoint, at 16x16 on rendered glyphs."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments import plots
from lm_core.data.image_sources import image_batches
from lm_core.errors import UserError
from lm_core.tokenizer import ByteTokenizer
from moma import vq
from moma.images import RenderedGlyphs
from moma.mixed_modal import (
    MixedModalLoader,
    MixedVocab,
    encode_pairs,
    mixed_document,
    modality_counts,
    reserved_ids_for_images,
)

# One stride-2 level keeps compilation short on CPU; test_deeper_configs_have_the_right_shapes covers f = 4, 8.
CONFIG = vq.VQConfig(image_size=16, downsample=2, codebook_size=32, code_dim=8, widths=(16,))
STEPS = 40
LR = 5e-3


def glyph_images(seed: int, count: int) -> np.ndarray:
    items = RenderedGlyphs(count, seed, 16)
    return np.stack([items[i].image for i in range(count)])  # [count, 16, 16, 3]


@pytest.fixture(scope="module")
def trained():
    batches = image_batches(RenderedGlyphs(2000, 0, 16), 16, seed=0)
    model, history = vq.train_vq(CONFIG, batches, STEPS, lr=LR, seed=0)
    return model, history


def test_config_validation():
    with pytest.raises(UserError, match=r"widths=\(8,\) must have log2\(downsample\)=2 entries"):
        vq.VQConfig(widths=(8,))
    with pytest.raises(UserError, match="downsample=3 must be a power of two"):
        vq.VQConfig(downsample=3)
    with pytest.raises(UserError, match="image_size=18 must be a positive multiple of downsample=4"):
        vq.VQConfig(image_size=18)
    assert (CONFIG.grid_size, CONFIG.tokens_per_image) == (8, 64)


@pytest.mark.parametrize(("downsample", "widths", "grid"), [(4, (8, 16), 8), (8, (8, 16, 16), 4)])
def test_deeper_configs_have_the_right_shapes(downsample, widths, grid):
    config = vq.VQConfig(image_size=32, downsample=downsample, codebook_size=16, code_dim=4, widths=widths)
    model = nnx.eval_shape(lambda: vq.VQTokenizer(config, rngs=nnx.Rngs(0)))  # shapes only, nothing compiled
    graphdef, state = nnx.split(model)

    def round_trip(state, images):
        m = nnx.merge(graphdef, state)
        codes = m.encode(images)
        return codes, m.decode(codes)

    codes, images = jax.eval_shape(round_trip, state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8))
    assert (codes.shape, codes.dtype) == ((2, grid, grid), jnp.int32)
    assert (images.shape, images.dtype) == ((2, 32, 32, 3), jnp.float32)


def test_code_statistics_hand_checked():
    stats = vq.code_statistics(jnp.array([[0, 0], [1, 1]]), 4)
    assert float(stats["usage"]) == 0.5  # 2 of 4 codes used
    assert float(stats["perplexity"]) == pytest.approx(2.0)  # two codes, equally often
    assert float(vq.code_statistics(jnp.array([3, 3, 3]), 4)["perplexity"]) == pytest.approx(1.0)


def quantizer(**changes) -> vq.VectorQuantizer:
    config = vq.VQConfig(image_size=8, downsample=2, codebook_size=2, code_dim=1, widths=(4,), **changes)
    return vq.VectorQuantizer(config, rngs=nnx.Rngs(params=vq.prng_key(0)))


def test_ema_update_moves_codes_to_the_mean_of_their_inputs():
    q = quantizer(ema_decay=0.0, dead_code_threshold=0.0)
    z = jnp.array([[0.0], [1.0], [10.0], [11.0]])  # [N=4, c=1]
    restarted = q.ema_update(z, jnp.array([0, 0, 1, 1]), jax.random.key(0), jnp.asarray(False))
    assert int(restarted) == 0
    np.testing.assert_allclose(q.embedding.get_value()[:, 0], [0.5, 10.5], rtol=1e-4)
    np.testing.assert_allclose(q.cluster_size.get_value(), [2.0, 2.0])
    np.testing.assert_array_equal(q.nearest(jnp.array([[[2.0], [9.0]]])), [[0, 1]])


def test_dead_codes_restart_at_encoder_outputs():
    # average use = 4 vectors / 2 codes = 2 per step; threshold 0.9 -> a code needs >= 1.8 assignments
    q = quantizer(ema_decay=0.0, dead_code_threshold=0.9)
    z = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    restarted = q.ema_update(z, jnp.array([0, 0, 0, 0]), jax.random.key(0), jnp.asarray(False))
    assert int(restarted) == 1
    assert float(q.embedding.get_value()[1, 0]) in {0.0, 1.0, 2.0, 3.0}
    assert float(q.cluster_size.get_value()[1]) == pytest.approx(1.8)  # restarted exactly at the threshold
    np.testing.assert_allclose(q.embedding.get_value()[0, 0], 1.5, rtol=1e-4)
    everything = q.ema_update(z, jnp.array([0, 0, 1, 1]), jax.random.key(1), jnp.asarray(True))
    assert int(everything) == 2


def test_encode_decode_shapes_and_code_range(trained):
    model, _ = trained
    images = glyph_images(5, 3)  # uint8 [3, 16, 16, 3]
    codes = model.encode(jnp.asarray(images))
    assert codes.shape == (3, 8, 8) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < CONFIG.codebook_size
    np.testing.assert_array_equal(model.encode(jnp.asarray(images, jnp.float32) / 255), codes)  # float in [0, 1]
    decoded = model.decode(codes)
    assert decoded.shape == (3, 16, 16, 3) and decoded.dtype == jnp.float32
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    batched = vq.encode_images(model, images, batch_size=2)  # padded last chunk
    np.testing.assert_array_equal(batched, codes)
    pictures = vq.decode_codes(model, batched, batch_size=2)
    assert pictures.shape == (3, 16, 16, 3) and pictures.dtype == np.uint8
    np.testing.assert_allclose(pictures, vq.to_uint8(decoded), atol=1)  # compiled vs eager: rounding only
    with pytest.raises(UserError, match=r"images of shape \(3, 8, 8, 3\) are invalid; valid: \[batch, 16, 16, 3\]"):
        model.encode(jnp.zeros((3, 8, 8, 3), jnp.uint8))
    # codes drop straight into a mixed-modal document
    vocab = MixedVocab(text_vocab_size=260, codebook_size=CONFIG.codebook_size)
    document = mixed_document([100], np.asarray(codes[0]), vocab, image_first=True)
    assert len(document) == 1 + CONFIG.tokens_per_image + 2


def test_training_reduces_reconstruction_error(trained):
    model, history = trained
    assert len(history) == STEPS and history[0]["restarted"] == CONFIG.codebook_size  # data-dependent init
    first, last = history[0]["mse"], np.mean([row["mse"] for row in history[-5:]])
    assert last < 0.5 * first, (first, last)
    result = vq.evaluate(model, glyph_images(1, 32))  # unseen validation glyphs
    assert result.mse < 0.5 * first and result.psnr == pytest.approx(-10 * np.log10(result.mse))
    assert result.usage > 0.3 and result.perplexity > 4  # dead-code restarts keep the codebook in use


def test_training_is_deterministic(trained):
    model, history = trained
    again, history_again = vq.train_vq(CONFIG, image_batches(RenderedGlyphs(2000, 0, 16), 16, seed=0), STEPS,
                                       lr=LR, seed=0)
    assert [row["loss"] for row in history] == [row["loss"] for row in history_again]
    images = glyph_images(2, 8)
    np.testing.assert_array_equal(vq.encode_images(model, images), vq.encode_images(again, images))
    other, _ = vq.train_vq(CONFIG, image_batches(RenderedGlyphs(2000, 0, 16), 16, seed=0), 2, lr=LR, seed=1)
    assert not np.array_equal(nnx.state(other)["quantizer"]["embedding"].get_value(),
                              nnx.state(again)["quantizer"]["embedding"].get_value())


def test_save_and_load_round_trip(trained, tmp_path):
    model, _ = trained
    directory = vq.save_vq(model, tmp_path / "vq")
    vq.save_vq(model, directory)  # overwriting a saved tokenizer is atomic and leaves no staging directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]
    loaded = vq.load_vq(directory)
    assert loaded.config == CONFIG
    images = glyph_images(3, 4)
    np.testing.assert_array_equal(vq.encode_images(loaded, images), vq.encode_images(model, images))
    (directory / vq.STATE_FILE).write_bytes(b"not an npz")
    with pytest.raises(UserError, match="state.npz' is missing or corrupt"):
        vq.load_vq(directory)
    (directory / vq.CONFIG_FILE).write_text('{"image_size": 16, "downsample": 3}')
    with pytest.raises(UserError, match="downsample=3"):
        vq.load_vq(directory)
    with pytest.raises(UserError, match="config.json' is missing or corrupt"):
        vq.load_vq(tmp_path / "nowhere")


def test_encoded_pairs_feed_the_mixed_modal_loader(trained):
    model, _ = trained
    items = RenderedGlyphs(5, 2, 16)
    pairs = encode_pairs(model, items)
    assert pairs.codes.shape == (5, 8, 8) and list(pairs.captions) == [items[i].caption for i in range(5)]
    tokenizer = ByteTokenizer(num_reserved_ids=reserved_ids_for_images(CONFIG.codebook_size))
    vocab = MixedVocab.for_tokenizer(tokenizer, CONFIG.codebook_size)
    batch = MixedModalLoader(pairs, tokenizer, vocab, seq_len=128, global_batch_size=2, seed=0).next()
    counts = modality_counts(batch["targets"], batch["loss_mask"], vocab)
    assert counts["image_tokens"].sum() > 0 and counts["text_tokens"].sum() > 0
    assert batch["inputs"].max() < vocab.vocab_size


def test_reconstruction_grid(tmp_path):
    images = glyph_images(0, 3)
    path = plots.write_reconstruction_grid(tmp_path / "grid.png", images, images[::-1], columns=2, scale=2)
    with Image.open(path) as grid:
        # 2 pair-rows of (original row + reconstruction row), 2 columns, 2-pixel gaps, doubled
        assert grid.size == ((2 * (16 + 2) + 2) * 2, (4 * (16 + 2) + 2) * 2)


def _run_entrypoint(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "experiments.moma.train_image_tokenizer", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_entrypoint_trains_saves_reports_and_refuses_other_flags(tmp_path):
    tiny = ["--image_size=16", "--codebook_size=16", "--code_dim=8", "--downsample=2", "--widths=8", "--batch_size=8",
            "--steps=4", "--eval_images=8", "--log_every=2"]
    result = _run_entrypoint(f"--workdir={tmp_path}", *tiny)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 4/4" in result.stdout and "codebook usage" in result.stdout
    for name in ("vq/config.json", "vq/state.npz", "reconstructions.png", "REPORT.md", "metrics.jsonl",
                 "config.json"):
        assert (tmp_path / name).is_file(), name
    assert "validation MSE" in (tmp_path / "REPORT.md").read_text()
    assert vq.load_vq(tmp_path / "vq").config.codebook_size == 16

    changed = _run_entrypoint(f"--workdir={tmp_path}", *tiny, "--codebook_size=32")
    assert changed.returncode == 2
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different config" in errors[0] and "codebook_size" in errors[0]
    assert vq.load_vq(tmp_path / "vq").config.codebook_size == 16  # the good tokenizer is untouched


def test_entrypoint_bad_source_is_one_line(tmp_path):
    result = _run_entrypoint(f"--workdir={tmp_path}", f"--source=images:{tmp_path / 'missing'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: image folder")
    assert not (tmp_path / "vq").exists()
