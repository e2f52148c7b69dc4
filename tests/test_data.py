"""Packing, the resumable loader, and the text sources (files, builtin corpus via TFDS, any TFDS dataset)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm_core.data import (
    BATCH_KEYS,
    LMDataLoader,
    PackCursor,
    TextSource,
    builtin_corpus,
    builtin_tfds,
    get_text_source,
    iter_eval_batches,
    pack_documents,
    pack_rows,
    register_text_source,
)
from lm_core.data.packing import tokenized_document
from lm_core.errors import UserError
from lm_core.tokenizer import ByteTokenizer
from tests.helpers import assert_batches_equal, check_resume_is_exact

TOKENIZER = ByteTokenizer()


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths, so rows mix short documents and long ones split across rows."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" #{i}" for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# packing


def test_pack_documents_hand_checked():
    # A = [BOS 5 6 7 EOS] has 4 pairs and 10 chars; B = [BOS 8 9 EOS] has 3 pairs and 4 chars; rows of 3.
    batch = pack_documents([[5, 6, 7], [8, 9]], seq_len=3, doc_chars=[10, 4])
    np.testing.assert_array_equal(batch.inputs, [[2, 5, 6], [7, 2, 8], [9, 0, 0]])
    np.testing.assert_array_equal(batch.targets, [[5, 6, 7], [3, 8, 9], [3, 0, 0]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1], [1, 2, 2], [1, 0, 0]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    # A's 10 chars over 4 pairs: 3 pairs own floor(10*3/4)=7; B's 4 chars over 3 pairs: 2 pairs own floor(8/3)=2.
    np.testing.assert_array_equal(batch.chars, [7, 3 + 2, 2])
    assert batch.inputs.dtype == np.int32 and batch.loss_mask.dtype == np.float32


def test_packing_invariants_on_random_documents():
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(4, 100, size=int(rng.integers(0, 40)))) for _ in range(50)]
    chars = [int(rng.integers(0, 200)) for _ in docs]
    batch = pack_documents(docs, seq_len=16, doc_chars=chars)
    real = batch.loss_mask == 1
    assert real.sum() == sum(len(d) + 1 for d in docs)  # every (input, target) pair exactly once
    assert batch.chars.sum() == sum(chars)
    assert (batch.segment_ids[~real] == 0).all() and (batch.segment_ids[real] > 0).all()
    assert real[:-1].all(), "every row but the last is full"
    assert not (batch.targets[real] == 2).any() and not (batch.inputs[real] == 3).any()  # no BOS target/EOS input


def test_pack_rows_resumes_from_its_cursor():
    docs = [tokenized_document(list(range(4, 4 + n)), n) for n in (5, 17, 2, 30, 9)]
    stream = lambda i: docs[i] if i < len(docs) else None  # noqa: E731
    whole, _ = pack_rows(stream, PackCursor(), seq_len=8, num_rows=10)
    first, cursor = pack_rows(stream, PackCursor(), seq_len=8, num_rows=3)
    rest, _ = pack_rows(stream, cursor, seq_len=8, num_rows=7)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(getattr(whole, key), np.concatenate([getattr(first, key), getattr(rest, key)]))


def test_whole_documents_start_a_new_row_instead_of_splitting():
    docs = [tokenized_document(list(range(4, 4 + n)), n) for n in (4, 5, 3, 20, 6)]  # 5, 6, 4, 21, 7 pairs
    stream = lambda i: docs[i] if i < len(docs) else None  # noqa: E731
    batch, cursor = pack_rows(stream, PackCursor(), seq_len=8, num_rows=6, whole_documents=True)
    # row 0: doc 0 (5 pairs) + padding, doc 1 (6) would not fit; row 1: doc 1 + padding; row 2: doc 2 (4 pairs), then
    # doc 3 (21 pairs) is longer than a row, so it is split as usual from the next free column: 4 + 8 + 8 + 1 pairs,
    # and doc 4 (7 pairs) fits whole after its last pair in row 5.
    np.testing.assert_array_equal(batch.segment_ids[:3], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0],
                                                          [1, 1, 1, 1, 2, 2, 2, 2]])
    assert (batch.segment_ids[5] == [1] + [2] * 7).all() and cursor == PackCursor(5, 0)
    assert batch.loss_mask.sum() == sum(doc.num_pairs for doc in docs) and batch.chars.sum() == sum([4, 5, 3, 20, 6])
    first, cursor = pack_rows(stream, PackCursor(), seq_len=8, num_rows=2, whole_documents=True)  # and resumes
    rest, _ = pack_rows(stream, cursor, seq_len=8, num_rows=4, whole_documents=True)
    np.testing.assert_array_equal(batch.inputs, np.concatenate([first.inputs, rest.inputs]))


# ---------------------------------------------------------------------------------------------------------------
# loader


def make_loader(docs, **overrides) -> LMDataLoader:
    kwargs = dict(seq_len=32, global_batch_size=4, seed=7)
    kwargs.update(overrides)
    return LMDataLoader(docs, TOKENIZER, **kwargs)


def test_loader_resume_is_exact():
    docs = synthetic_documents(3)  # tiny: the 5 batches cross into the next epoch
    loader = check_resume_is_exact(lambda: make_loader(docs, seq_len=64), steps=5, save_at=2)
    assert loader.epoch >= 1


def test_loader_shapes_and_determinism():
    docs = synthetic_documents(30)
    first = make_loader(docs).next()
    assert first["inputs"].shape == (4, 32) and first["chars"].shape == (4,)
    assert_batches_equal(first, make_loader(docs).next())
    assert not np.array_equal(first["inputs"], make_loader(docs, seed=8).next()["inputs"])


def test_multi_process_slices_concatenate_to_the_single_process_batch():
    docs = synthetic_documents(25)
    single = make_loader(docs, global_batch_size=6)
    hosts = [make_loader(docs, global_batch_size=6, process_index=i, process_count=2) for i in range(2)]
    for _ in range(4):
        whole = single.next()
        parts = [host.next() for host in hosts]
        assert parts[0]["inputs"].shape == (3, 32)
        assert_batches_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS})


def test_single_pass_sees_every_character_once():
    docs = synthetic_documents(15)
    loader = make_loader(docs, shuffle=False, repeat=False)
    batches = list(loader)
    assert sum(int(b["chars"].sum()) for b in batches) == sum(len(d) for d in docs)
    assert (batches[-1]["loss_mask"] == 0).any()


def test_eval_batches_are_deterministic_padded_and_limited():
    docs = synthetic_documents(9)
    batches = list(iter_eval_batches(docs, TOKENIZER, seq_len=64, batch_size=4))
    again = list(iter_eval_batches(docs, TOKENIZER, seq_len=64, batch_size=4))
    assert len(batches) == len(again) >= 2
    for a, b in zip(batches, again, strict=True):
        assert_batches_equal(a, b)
    last = batches[-1]
    assert last["inputs"].shape == (4, 64) and last["loss_mask"][-1].sum() == 0  # padding row
    assert sum(int(b["chars"].sum()) for b in batches) == sum(len(d) for d in docs)
    assert len(list(iter_eval_batches(docs, TOKENIZER, seq_len=64, batch_size=4, max_batches=1))) == 1


def test_loader_user_errors():
    docs = synthetic_documents(5)
    with pytest.raises(UserError, match="global_batch_size=5 is not divisible by process_count=2"):
        make_loader(docs, global_batch_size=5, process_count=2)
    with pytest.raises(UserError, match="seq_len=0"):
        make_loader(docs, seq_len=0)
    with pytest.raises(UserError, match="no documents"):
        make_loader([])
    state = make_loader(docs).state()
    with pytest.raises(UserError, match="seed: saved 7, now 8"):
        make_loader(docs, seed=8).restore(state)


# ---------------------------------------------------------------------------------------------------------------
# sources: registry and files:


def test_unknown_spec_lists_valid_forms():
    # Other packages may register more sources in the same process (moma's image_captions:), so check that the
    # built-in forms are all listed rather than the exact list.
    with pytest.raises(UserError, match=r"unknown text source 'nope:x'; valid: ") as error:
        get_text_source("nope:x")
    for form in ("builtin", "files:<glob>", "tfds:<name>[/<config>]"):
        assert form in str(error.value)


def test_register_text_source():
    register_text_source("unit_test_source", lambda arg, *, data_dir: TextSource("t", {"train": [arg]}),
                         overwrite=True)
    assert list(get_text_source("unit_test_source:hello").split("train")) == ["hello"]
    with pytest.raises(UserError, match="no split 'validation'"):
        get_text_source("unit_test_source:x").split("validation")


def test_files_source_splits_deterministically(tmp_path, monkeypatch):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n")
    source = get_text_source(f"files:{tmp_path}/*.txt")
    train, validation = list(source.split("train")), list(source.split("validation"))
    assert len(train) + len(validation) == 40 and validation and train
    assert sorted(train + validation) == sorted(f"document number {i}\n" for i in range(40))
    # the split depends on paths below the glob's directory, not on the working directory
    monkeypatch.chdir(tmp_path)
    assert list(get_text_source("files:*.txt").split("validation")) == validation


def test_files_source_two_files_get_one_document_per_split(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    source = get_text_source(f"files:{tmp_path}/*.txt")
    assert sorted([*source.split("train"), *source.split("validation")]) == ["first", "second"]


def test_files_source_single_file_is_split_into_paragraphs(tmp_path):
    (tmp_path / "book.txt").write_text("\n\n".join(f"Paragraph {i}." for i in range(30)))
    source = get_text_source(f"files:{tmp_path}/book.txt")
    assert len(source.split("train")) + len(source.split("validation")) == 30
    assert len(source.split("validation")) >= 1


def test_files_source_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"'files:.*\*\.md' matches no files"):
        get_text_source(f"files:{tmp_path}/*.md")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="matches only empty files"):
        get_text_source(f"files:{tmp_path}/*.txt")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt' is not valid UTF-8"):
        get_text_source(f"files:{tmp_path}/*.txt")


# ---------------------------------------------------------------------------------------------------------------
# TFDS-backed sources (no TensorFlow, no network)


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    get_text_source("builtin", data_dir=data_dir)  # prepares the dataset once for the session
    return data_dir


def test_builtin_corpus_via_tfds(builtin_data_dir):
    info = builtin_data_dir / builtin_tfds.BUILTIN_NAME / "1.0.0" / "dataset_info.json"
    prepared_at = info.stat().st_mtime_ns
    source = get_text_source("builtin", data_dir=builtin_data_dir)
    assert info.stat().st_mtime_ns == prepared_at, "second open must reuse the prepared dataset"
    train, validation = source.split("train"), source.split("validation")
    assert len(train) > 500 and len(validation) > 10
    assert isinstance(train[0], str) and len(train[-1]) >= builtin_corpus.MIN_CHARS
    assert train[1:4][0] == train[1] and len(train[1:4]) == 3
    assert "tensorflow" not in sys.modules


def test_builtin_corpus_is_deterministic(builtin_data_dir):
    rebuilt = builtin_corpus.split_corpus(builtin_corpus.build_corpus())
    source = get_text_source("builtin", data_dir=builtin_data_dir)
    for split in ("train", "validation"):
        stored = source.split(split)
        assert sorted(stored[i] for i in range(len(stored))) == sorted(doc.text for doc in rebuilt[split])
    titles = [doc.title for doc in rebuilt["train"] + rebuilt["validation"]]
    assert len(set(titles)) == len(titles)
    assert all(builtin_corpus.is_validation(doc.title) for doc in rebuilt["validation"])


class LmCoreTestReviews(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dataset: the text feature is not called "text", and there is no validation split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"label": tfds.features.ClassLabel(num_classes=2), "review": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"label": i % 2, "review": f"review {i}: ünïcode is fine"}


def test_tfds_source_reads_a_local_builder_without_network(tmp_path):
    source = get_text_source("tfds:lm_core_test_reviews", data_dir=tmp_path)
    train, validation = source.split("train"), source.split("validation")
    assert (len(train), len(validation)) == (38, 2)  # last 5% of train held out
    texts = sorted([*train, *validation])
    assert texts == sorted(f"review {i}: ünïcode is fine" for i in range(40))
    assert "tensorflow" not in sys.modules


def test_tfds_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown TFDS dataset 'lm_core_test_reviewz'.*did you mean"):
        get_text_source("tfds:lm_core_test_reviewz", data_dir=tmp_path)


def test_importing_the_data_package_does_not_import_tfds():
    code = ("import sys, lm_core.data, lm_core.tokenizer; "
            "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
