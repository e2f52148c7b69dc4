"""Sentencepiece training (deterministic, cached, exact size, reserved ids) and the byte fallback tokenizer."""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import numpy as np
import pytest

from lm_core import tokenizer as tokenizer_lib
from lm_core.errors import UserError
from lm_core.tokenizer import ByteTokenizer, Tokenizer, TokenizerSpec, load_tokenizer, train_tokenizer

# ~0.5 MB of English that every Python ships: trains a 512-piece BPE in a fraction of a second.
CORPUS = [topics[name] for name in sorted(topics)]
SAMPLE = "def f(x):\n    return x + 12345  # naïve café, 日本語 🙂\n\nTwo  spaces."


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(CORPUS, TokenizerSpec(vocab_size=512, num_reserved_ids=8), tmp_path_factory.mktemp("tok"))


def test_exact_vocab_size_special_ids_and_reserved_range(trained):
    assert trained.vocab_size == 512
    assert (trained.pad_id, trained.unk_id, trained.bos_id, trained.eos_id) == (0, 1, 2, 3)
    assert trained.reserved_range == range(504, 512)
    assert trained.id_to_piece(0) == "<pad>" and trained.piece_to_id("</s>") == 3
    ids = trained.encode_batch(CORPUS[:50])
    assert max(max(x) for x in ids) < 504, "text must never encode into the reserved range"


def test_encode_decode_roundtrip_with_byte_fallback_and_split_digits(trained):
    ids = trained.encode(SAMPLE)
    assert trained.decode(ids) == SAMPLE
    assert trained.decode(np.asarray(ids)) == SAMPLE  # numpy ids are fine too
    assert all(trained.id_to_piece(trained.encode("12345")[i + 1]) == d for i, d in enumerate("12345"))
    # pad and reserved ids are dropped, bos/eos decode to nothing
    assert trained.decode([trained.bos_id, *ids, 0, 505, trained.eos_id]) == SAMPLE


def test_encode_batch_matches_encode(trained):
    texts = CORPUS[:5] + ["", SAMPLE]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]


def test_training_is_deterministic(tmp_path):
    spec = TokenizerSpec(vocab_size=400, seed=3, user_defined_symbols=("<image>",))
    first = train_tokenizer(CORPUS, spec, tmp_path / "a")
    second = train_tokenizer(iter(CORPUS), spec, tmp_path / "b")  # any iterable, separate cache
    assert first.model_proto == second.model_proto
    assert first.encode(SAMPLE + " <image>") == second.encode(SAMPLE + " <image>")
    assert first.piece_to_id("<image>") == 4  # user symbols come right after the specials


def test_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    spec = TokenizerSpec(vocab_size=400)
    first = train_tokenizer(CORPUS, spec, tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((entry / "spec.json").read_text())["spec"]["vocab_size"] == 400

    def fail(*args, **kwargs):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(tokenizer_lib, "_train_sentencepiece", fail)
    assert train_tokenizer(CORPUS, spec, tmp_path).model_proto == first.model_proto
    with pytest.raises(AssertionError, match="retrained"):  # a different corpus is a different entry
        train_tokenizer(CORPUS[:-1], spec, tmp_path)
    assert not list(tmp_path.glob("*/.*.tmp")), "no temporary files left behind"


def test_cache_keys_of_whole_corpora_are_the_ones_cached_tokenizers_have():
    # the key before sentence sampling existed (sha256 of corpus, spec and recipe 1): cached entries stay valid
    assert tokenizer_lib.cache_key("ab" * 32, TokenizerSpec(vocab_size=512)) == "daccc87dda92de5b4d6928a9"


def test_a_corpus_over_the_sentence_bound_trains_on_a_seeded_sample(tmp_path):
    spec = TokenizerSpec(vocab_size=400)
    count = sum(1 for text in CORPUS for _ in tokenizer_lib._sentences(text))
    corpus = tokenizer_lib._read_corpus(iter(CORPUS), count, seed=0)  # at the bound: every sentence, in order
    assert corpus.sentences == [s for text in CORPUS for s in tokenizer_lib._sentences(text)]
    whole = train_tokenizer(CORPUS, spec, tmp_path / "cache", max_sentences=count)
    sampled = train_tokenizer(iter(CORPUS), spec, tmp_path / "cache", max_sentences=count // 4)
    again = train_tokenizer(CORPUS, spec, tmp_path / "other", max_sentences=count // 4)
    assert sampled.model_proto == again.model_proto != whole.model_proto  # deterministic, and its own cache entry
    infos = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/spec.json")]
    assert sorted(info.get("training_sentences", 0) for info in infos) == [0, count // 4]
    assert {info["corpus_sentences"] for info in infos} == {count}
    assert len(tokenizer_lib._read_corpus(iter(CORPUS), 10, seed=0).sentences) == 10


def test_save_load_roundtrip(trained, tmp_path):
    trained.save(tmp_path / "t.model")
    loaded = load_tokenizer(tmp_path / "t.model")
    assert isinstance(loaded, Tokenizer)
    assert loaded.vocab_size == 512 and loaded.reserved_range == trained.reserved_range
    assert loaded.encode(SAMPLE) == trained.encode(SAMPLE)


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="bad.model"):
        Tokenizer.load(tmp_path / "bad.model")


@pytest.mark.parametrize(("spec", "message"), [
    (TokenizerSpec(vocab_size=200), r"vocab_size=200 is too small; valid: >= 261"),
    (TokenizerSpec(vocab_size=300, num_reserved_ids=40), r"vocab_size=300 is too small; valid: >= 301"),
    (TokenizerSpec(vocab_size=280), r"vocab_size=280 is too small for this corpus; valid: >= \d+"),
    (TokenizerSpec(vocab_size=1_000_000), r"vocab_size=1000000 is too large for this corpus; valid: <= \d+"),
    (TokenizerSpec(vocab_size=400, user_defined_symbols=("a", "a")), r"user_defined_symbols"),
])
def test_bad_vocab_sizes_are_one_line_user_errors(tmp_path, spec, message):
    with pytest.raises(UserError, match=message) as error:
        train_tokenizer(CORPUS[:20], spec, tmp_path)
    assert "\n" not in str(error.value)


def test_too_small_error_names_a_size_that_works(tmp_path):
    with pytest.raises(UserError) as error:
        train_tokenizer(CORPUS[:20], TokenizerSpec(vocab_size=280), tmp_path)
    minimum = int(str(error.value).split(">= ")[1].split()[0])
    assert train_tokenizer(CORPUS[:20], TokenizerSpec(vocab_size=minimum), tmp_path).vocab_size == minimum


def test_empty_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer(["", "  \n\n "], TokenizerSpec(vocab_size=400), tmp_path)


def test_byte_tokenizer():
    tok = ByteTokenizer(num_reserved_ids=4)
    assert tok.vocab_size == 264 and tok.reserved_range == range(260, 264)
    assert tok.encode("A") == [ord("A") + 4]
    ids = tok.encode(SAMPLE)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, 0, 261]) == SAMPLE
    assert tok.encode_batch(["ab", ""]) == [[101, 102], []]
    assert tok.piece_to_id("a") == 101 and tok.piece_to_id("ab") == tok.unk_id


def test_byte_tokenizer_save_load(tmp_path):
    ByteTokenizer(num_reserved_ids=2).save(tmp_path / "byte.json")
    loaded = load_tokenizer(tmp_path / "byte.json")
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == 262
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError, match="bad.json"):
        ByteTokenizer.load(tmp_path / "bad.json")
