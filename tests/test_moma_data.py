"""moma.images (builtin glyphs, images:<folder>, tfds:) and moma.mixed_modal (vocabulary, documents, loader)."""

from __future__ import annotations

import logging
import sys
import unicodedata

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from lm_core.data import get_text_source
from lm_core.data.image_sources import fit_image, image_batches
from lm_core.data.packing import BATCH_KEYS
from lm_core.errors import UserError
from lm_core.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from moma.images import RenderedGlyphs, get_image_source, glyph_spec
from moma.mixed_modal import (
    CodedPairs,
    MixedModalLoader,
    MixedVocab,
    image_first,
    iter_mixed_eval_batches,
    mixed_document,
    modality_counts,
    per_modality_sums,
    reserved_ids_for_images,
)
from tests.helpers import assert_batches_equal, check_resume_is_exact

# ---------------------------------------------------------------------------------------------------------------
# builtin glyphs


def test_rendered_glyphs_are_deterministic_and_sized():
    glyphs = RenderedGlyphs(count=20, seed=3, image_size=16)
    first = glyphs[5]
    assert first.image.shape == (16, 16, 3) and first.image.dtype == np.uint8
    again = RenderedGlyphs(count=20, seed=3, image_size=16)[5]
    np.testing.assert_array_equal(first.image, again.image)
    assert first.caption == again.caption
    assert not np.array_equal(first.image, glyphs[6].image)
    assert glyphs[5].caption != RenderedGlyphs(count=20, seed=4, image_size=16)[5].caption
    assert RenderedGlyphs(count=20, seed=3, image_size=32)[5].image.shape == (32, 32, 3)
    assert len(glyphs[4:9]) == 5 and glyphs[4:9][1].caption == first.caption  # slices are views
    assert first.image.std() > 10  # something is drawn, not a flat background


def test_captions_name_the_glyph_font_colours_size_and_position():
    glyphs = RenderedGlyphs(count=30, seed=0, image_size=16)
    for i in range(30):
        spec = glyph_spec(0, i)
        caption = glyphs[i].caption
        assert unicodedata.name(spec.char) in caption
        assert caption.startswith(f"a {spec.size} {spec.foreground} ")
        assert f"at the {spec.position} on a {spec.background} background" in caption
        assert "DejaVu" in caption and spec.foreground != spec.background
    spec = glyph_spec(0, 0)
    hand = f"a {spec.size} {spec.foreground} {unicodedata.name(spec.char)} in "
    assert glyphs[0].caption.startswith(hand)


def test_builtin_source_splits_and_count():
    source = get_image_source("builtin:40", image_size=16)
    assert len(source.split("train")) == 40 and len(source.split("validation")) > 0
    assert source.split("train")[0].caption != source.split("validation")[0].caption
    with pytest.raises(UserError, match="builtin:abc"):
        get_image_source("builtin:abc")
    with pytest.raises(UserError, match="unknown image source 'nope:x'; valid: builtin"):
        get_image_source("nope:x")
    with pytest.raises(UserError, match="image_size=4"):
        get_image_source("builtin", image_size=4)


def test_fit_image_center_crops_and_composites_transparency():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 200  # the centre square is bright, the sides are cut away
    fitted = fit_image(Image.fromarray(wide), 16)
    assert fitted.shape == (16, 16, 3) and fitted.min() >= 190
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert fit_image(transparent, 8).min() == 255  # composited on white


def test_image_batches_fill_from_the_next_epoch_and_repeat_deterministically():
    items = RenderedGlyphs(count=3, seed=0, image_size=8)
    batches = image_batches(items, 4, seed=1)
    first = next(batches)
    assert first.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(first, next(image_batches(items, 4, seed=1)))


# ---------------------------------------------------------------------------------------------------------------
# images:<folder>


def _png(path, colour, size=(24, 18)):
    Image.new("RGB", size, colour).save(path)


def test_folder_source_skips_and_names_a_corrupt_file(tmp_path, caplog):
    _png(tmp_path / "red_square.png", (255, 0, 0))
    _png(tmp_path / "blue-thing.png", (0, 0, 255))
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 30), (0, 255, 0)).save(tmp_path / "sub" / "green.jpg", quality=90)
    _png(tmp_path / "gray.png", (128, 128, 128))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "notes.md").write_text("not an image, ignored")
    (tmp_path / "captions.tsv").write_text("# comment\nsub/green.jpg\ta green field\ngray.png\tfog\n")
    with caplog.at_level(logging.WARNING, logger="moma.images"):
        source = get_image_source(f"images:{tmp_path}", image_size=16)
    assert source.skipped == ("broken.png",)
    assert "broken.png" in caplog.text and "1 unreadable" in caplog.text
    items = [*source.split("train"), *source.split("validation")]
    assert len(source.split("train")) == 3 and len(source.split("validation")) == 1
    captions = {item.key.split(str(tmp_path))[-1].lstrip("/"): item.caption for item in items}
    assert captions == {"blue-thing.png": "blue thing", "gray.png": "fog", "red_square.png": "red square",
                        "sub/green.jpg": "a green field"}
    for item in items:
        assert item.image.shape == (16, 16, 3) and item.image.dtype == np.uint8
    red = next(item for item in items if item.caption == "red square")
    assert tuple(red.image[8, 8]) == (255, 0, 0)


def test_folder_source_user_errors(tmp_path):
    with pytest.raises(UserError, match=f"image folder '{tmp_path}' has no readable image .*no image files"):
        get_image_source(f"images:{tmp_path}")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="has no readable image .*all unreadable: bad.jpg"):
        get_image_source(f"images:{tmp_path}")
    with pytest.raises(UserError, match="does not exist"):
        get_image_source(f"images:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="names no folder"):
        get_image_source("images:")
    _png(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "captions.txt").write_text("ok.png has no tab\n")
    with pytest.raises(UserError, match=r"captions.txt:1 is not 'filename<TAB>caption'"):
        get_image_source(f"images:{tmp_path}")


def test_image_captions_text_source(tmp_path):
    _png(tmp_path / "a_cat.png", (1, 2, 3))
    _png(tmp_path / "a_dog.png", (4, 5, 6))
    texts = get_text_source(f"image_captions:images:{tmp_path}")
    assert sorted([*texts.split("train"), *texts.split("validation")]) == ["a cat", "a dog"]
    builtin = get_text_source("image_captions:builtin:5").split("train")
    assert list(builtin) == [glyph_spec(0, i).caption for i in range(5)]


# ---------------------------------------------------------------------------------------------------------------
# tfds:<name>


class MomaTestImageCaptions(tfds.core.GeneratorBasedBuilder):
    """A tiny local image-caption dataset (no validation split: the last ~5% of train is held out)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6)}

    def _generate_examples(self, count):
        for i in range(count):
            # A PIL image, not an array: TFDS encodes arrays with TensorFlow, PIL images with Pillow.
            image = Image.fromarray(np.full((12 + i, 20, 3), 40 * i, np.uint8))
            yield i, {"image": image, "caption": f"a flat image of brightness {40 * i}"}


def test_tfds_image_source_reads_a_local_builder(tmp_path):
    source = get_image_source("tfds:moma_test_image_captions", image_size=8, data_dir=tmp_path)
    train, validation = source.split("train"), source.split("validation")
    assert (len(train), len(validation)) == (5, 1)
    items = [*train, *validation]
    assert sorted(item.caption for item in items) == sorted(f"a flat image of brightness {40 * i}" for i in range(6))
    for item in items:
        assert item.image.shape == (8, 8, 3)
        assert int(item.image.mean()) == int(item.caption.rsplit(" ", 1)[1])
    assert "tensorflow" not in sys.modules
    with pytest.raises(UserError, match="unknown TFDS dataset 'moma_test_image_captionz'.*did you mean"):
        get_image_source("tfds:moma_test_image_captionz", data_dir=tmp_path)


class MomaTestNeedsAModule(tfds.core.GeneratorBasedBuilder):
    """A builder that cannot be made here: it imports a module that is not installed (as many TFDS builders import
    TensorFlow, which TFDS does not install)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, **kwargs):
        import moma_test_module_that_is_not_installed  # noqa: F401

        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({}))

    def _split_generators(self, dl_manager):
        return {}

    def _generate_examples(self):
        yield from ()


def test_a_tfds_builder_that_needs_a_missing_module_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"TFDS dataset 'moma_test_needs_a_module': a module its builder needs is not "
                                        r"installed \(No module named 'moma_test_module_that_is_not_installed'\)"):
        get_image_source("tfds:moma_test_needs_a_module", data_dir=tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# mixed-modal vocabulary and documents

K = 4  # image codes in the hand-checked examples
TOKENIZER = ByteTokenizer(num_reserved_ids=K + 2 + 1)  # one spare reserved id stays unused
VOCAB = MixedVocab.for_tokenizer(TOKENIZER, K)


def test_vocab_layout_is_hand_checked():
    assert reserved_ids_for_images(K) == 6
    assert TOKENIZER.vocab_size == 4 + 256 + 7 == 267
    assert (VOCAB.text_vocab_size, VOCAB.image_offset, VOCAB.boi_id, VOCAB.eoi_id, VOCAB.vocab_size) == (
        260, 260, 264, 265, 267)
    assert VOCAB.image_token_range == (260, 264)
    ids = np.array([3, 259, 260, 263, 264, 265, 266])
    np.testing.assert_array_equal(VOCAB.is_image_token(ids), [False, False, True, True, False, False, False])
    np.testing.assert_array_equal(VOCAB.image_ids(np.array([[0, 3]])), [[260, 263]])
    np.testing.assert_array_equal(VOCAB.codes_of(np.array([261, 262])), [1, 2])
    assert MixedVocab(100, 8).vocab_size == 110
    with pytest.raises(UserError, match="reserves 7 ids, too few for codebook_size=8; valid: num_reserved_ids >= 10"):
        MixedVocab.for_tokenizer(TOKENIZER, 8)
    with pytest.raises(UserError, match=r"image codes span \[0, 4\]; valid: \[0, 4\)"):
        VOCAB.image_ids(np.array([0, 4]))


def test_mixed_documents_hand_checked():
    caption = TOKENIZER.encode("hi")
    assert caption == [108, 109]
    codes = np.array([[0, 1], [2, 3]])
    text_first = mixed_document(caption, codes, VOCAB, image_first=False)
    image_first_doc = mixed_document(caption, codes, VOCAB, image_first=True)
    np.testing.assert_array_equal(text_first, [108, 109, 264, 260, 261, 262, 263, 265])
    np.testing.assert_array_equal(image_first_doc, [264, 260, 261, 262, 263, 265, 108, 109])
    np.testing.assert_array_equal(VOCAB.is_image_token(text_first), [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(VOCAB.is_image_token(image_first_doc), [0, 1, 1, 1, 1, 0, 0, 0])
    with pytest.raises(UserError, match="caption ids span"):
        mixed_document([261], codes, VOCAB, image_first=False)


def test_image_first_is_a_balanced_deterministic_hash():
    flags = [image_first(0, i) for i in range(2000)]
    assert 0.45 < np.mean(flags) < 0.55
    assert flags == [image_first(0, i) for i in range(2000)]
    assert flags != [image_first(1, i) for i in range(2000)]
    assert flags != [image_first(0, i, epoch=1) for i in range(2000)]  # a pair is seen both ways over epochs


def test_per_modality_sums_hand_checked():
    targets = np.array([[108, 260, 261, 265]])
    losses = np.array([[1.0, 2.0, 3.0, 4.0]])
    mask = np.array([[1.0, 1.0, 0.0, 1.0]])
    sums = per_modality_sums(losses, targets, mask, VOCAB)
    assert {k: float(v) for k, v in sums.items()} == {"text_loss_sum": 5.0, "image_loss_sum": 2.0,
                                                      "text_tokens": 2.0, "image_tokens": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# loader


def coded_pairs(count: int, seed: int = 0, grid: int = 2) -> CodedPairs:
    rng = np.random.default_rng(seed)
    captions = [f"pair {i} " + "x" * int(rng.integers(0, 6)) for i in range(count)]
    return CodedPairs(captions, rng.integers(0, K, (count, grid, grid)), K)


def make_loader(pairs: CodedPairs, **overrides) -> MixedModalLoader:
    kwargs = dict(seq_len=16, global_batch_size=4, seed=7)
    kwargs.update(overrides)
    return MixedModalLoader(pairs, TOKENIZER, VOCAB, **kwargs)


def test_loader_packs_one_pair_as_hand_computed():
    pairs = CodedPairs(["hi"], np.array([[[0, 1], [2, 3]]]), K)
    batch = next(iter_mixed_eval_batches(pairs, TOKENIZER, VOCAB, seq_len=12, batch_size=1))
    first = image_first(0, 0, 0)
    body = [264, 260, 261, 262, 263, 265, 108, 109] if first else [108, 109, 264, 260, 261, 262, 263, 265]
    document = [BOS_ID, *body, EOS_ID]  # 10 tokens -> 9 (input, target) pairs
    np.testing.assert_array_equal(batch["inputs"][0], [*document[:-1], 0, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0], [*document[1:], 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 9 + [0] * 3)
    np.testing.assert_array_equal(batch["positions"][0], [*range(9), 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1.0] * 9 + [0.0] * 3)
    counts = modality_counts(batch["targets"], batch["loss_mask"], VOCAB)
    assert (batch["chars"][0], counts["image_tokens"][0], counts["text_tokens"][0]) == (2, 4, 5)


def test_loader_resume_is_exact_across_epochs():
    pairs = coded_pairs(3)  # tiny: 6 batches cross several epochs
    loader = check_resume_is_exact(lambda: make_loader(pairs), steps=6, save_at=2)
    assert loader.epoch >= 1


def test_loader_batches_count_modalities_and_respect_the_packing_convention():
    pairs = coded_pairs(20, grid=3)
    loader = make_loader(pairs, seq_len=32)
    for _ in range(3):
        batch = loader.next()
        assert batch.keys() == set(BATCH_KEYS) and batch["inputs"].shape == (4, 32)
        image = VOCAB.is_image_token(batch["targets"]) & (batch["loss_mask"] > 0)
        counts = modality_counts(batch["targets"], batch["loss_mask"], VOCAB)
        np.testing.assert_array_equal(counts["image_tokens"], image.sum(-1))
        np.testing.assert_array_equal(counts["text_tokens"] + counts["image_tokens"], batch["loss_mask"].sum(-1))
        assert image.sum() > 0 and (~image & (batch["loss_mask"] > 0)).sum() > 0  # both modalities present
        assert not np.any(batch["targets"][batch["loss_mask"] > 0] == BOS_ID)
    assert_batches_equal(make_loader(pairs, seq_len=32).next(), make_loader(pairs, seq_len=32).next())
    assert not np.array_equal(make_loader(pairs).next()["inputs"], make_loader(pairs, seed=8).next()["inputs"])


def test_multi_process_slices_concatenate_to_the_single_process_batch():
    pairs = coded_pairs(9)
    single = make_loader(pairs, global_batch_size=6)
    hosts = [make_loader(pairs, global_batch_size=6, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        whole, parts = single.next(), [host.next() for host in hosts]
        assert_batches_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS})


def test_single_pass_sees_every_pair_once_and_half_each_way():
    pairs = coded_pairs(40)
    batches = list(iter_mixed_eval_batches(pairs, TOKENIZER, VOCAB, seq_len=16, batch_size=4))
    assert sum(int(modality_counts(b["targets"], b["loss_mask"], VOCAB)["image_tokens"].sum()) for b in batches) \
        == 40 * 4
    assert sum(int(b["chars"].sum()) for b in batches) == sum(len(c) for c in pairs.captions)
    assert 10 < sum(image_first(0, i) for i in range(40)) < 30


def test_loader_user_errors(tmp_path):
    pairs = coded_pairs(3)
    loader = make_loader(pairs)
    state = loader.state()
    with pytest.raises(UserError, match="saved for a different stream .*seed: saved 7, now 8"):
        make_loader(pairs, seed=8).restore(state)
    with pytest.raises(UserError, match="lacks"):
        loader.restore({"document": 0})
    with pytest.raises(UserError, match="codebook_size=8 but the vocabulary has 4"):
        MixedModalLoader(CodedPairs(["a"], np.zeros((1, 2, 2)), 8), TOKENIZER, VOCAB, seq_len=8,
                         global_batch_size=1, seed=0)
    with pytest.raises(UserError, match="does not match"):
        MixedModalLoader(pairs, ByteTokenizer(num_reserved_ids=6), VOCAB, seq_len=8, global_batch_size=1, seed=0)
    with pytest.raises(UserError, match="global_batch_size=5 is not divisible"):
        make_loader(pairs, global_batch_size=5, process_count=2)
    with pytest.raises(UserError, match=r"image codes span \[4, 4\]; valid: \[0, 4\)"):
        CodedPairs(["a"], np.full((1, 2, 2), 4), K)
    path = tmp_path / "pairs.npz"
    pairs.save(path)
    loaded = CodedPairs.load(path)
    assert list(loaded.captions) == list(pairs.captions) and loaded.codebook_size == K
    np.testing.assert_array_equal(loaded.codes, pairs.codes)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.npz' are missing or corrupt"):
        CodedPairs.load(tmp_path / "bad.npz")
