"""Pretrained tokenizers with their own special ids, and every tokenizer exported for transformers.AutoTokenizer.

Every tokenizer is built here, offline: a byte-level BPE tokenizer.json (GPT-2 / Qwen style, specials at the END of
the ids, no BOS), a Llama-2 style sentencepiece BPE (unk 0, bos 1, eos 2, no pad), a T5 style sentencepiece
unigram (pad 0, eos 1, unk 2, no BOS, extra whitespace removed) and our own trained Tokenizer.
"""

from __future__ import annotations

import io
import json
import unicodedata
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import sentencepiece as spm

from lm_core import hf_tokenizer
from lm_core.errors import UserError
from lm_core.hf_tokenizer import PretrainedTokenizer, export_hf_tokenizer, load_any_tokenizer
from lm_core.tokenizer import ByteTokenizer, Tokenizer, TokenizerSpec, train_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [topics[name] for name in sorted(topics)][:60]
VIETNAMESE = "Tiếng Việt có dấu, người Hà Nội"
HARD = "\n".join([
    "  leading spaces, trailing spaces   ", "two  spaces,   three,\ttabs\t\tand\r\nwindows lines", "", "",
    "digits 1234567890 3.14159 007", "naïve café Ünïcödé Straße", VIETNAMESE, unicodedata.normalize("NFD", VIETNAMESE),
    unicodedata.normalize("NFD", "한국어 텍스트"), "日本語のテキスト 中文 한국어", "emoji 🙂👍🏽🇫🇷 ❤️ 1️⃣ 👨‍👩‍👧",
    "unseen ꙮ ᚠᛇᚻ 𝔘𝔫𝔦 ﬁ ² ½ Ａｂｃ ™", "\u00a0no-break\u3000ideographic ", "▁visible▁space", "ends with spaces  ",
])
SPECIALS_IN_TEXT = " </s> <s> <pad> <unk> <reserved_0> "


# --- tokenizers built in-test -----------------------------------------------------------------------------------


def write_byte_bpe(directory: Path, **config) -> Path:
    """A byte-level BPE tokenizer.json trained on CORPUS whose specials are added last: <|endoftext|> is the
    largest id but one, like Qwen's; `config` becomes tokenizer_config.json when given."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), show_progress=False))
    bpe.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def train_sentencepiece(path: Path, **options) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line for text in CORPUS for line in text.split("\n")
                                                          if line.strip()), model_writer=model, vocab_size=400,
                                   byte_fallback=True, minloglevel=2, num_threads=1, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return write_byte_bpe(tmp_path_factory.mktemp("qwen"), bos_token=None, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory) -> Path:
    """Llama-2's recipe: BPE, identity normalization, spaces kept, digits split, unk 0 / bos 1 / eos 2, no pad."""
    return train_sentencepiece(tmp_path_factory.mktemp("llama") / "tokenizer.model", model_type="bpe",
                               normalization_rule_name="identity", remove_extra_whitespaces=False,
                               split_digits=True, allow_whitespace_only_pieces=True,
                               unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory) -> Path:
    """T5's recipe: unigram, nmt_nfkc, extra whitespace removed, pad 0 / eos 1 / unk 2, no BOS."""
    return train_sentencepiece(tmp_path_factory.mktemp("t5") / "tokenizer.model", model_type="unigram",
                               pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(CORPUS, TokenizerSpec(vocab_size=512), tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def ours_reserved(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(CORPUS, TokenizerSpec(vocab_size=520, num_reserved_ids=8), tmp_path_factory.mktemp("res"))


# --- PretrainedTokenizer ----------------------------------------------------------------------------------------


def test_tokenizer_json_special_ids_come_from_the_configs_with_the_documented_fallbacks(qwen_dir, tmp_path):
    tok = PretrainedTokenizer.load(qwen_dir)
    eot = tok.piece_to_id("<|endoftext|>")
    assert tok.vocab_size == eot + 2 == 402 and tok.reserved_range == range(402, 402)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot), "no BOS / no pad -> the EOS"
    # dict-valued tokens in special_tokens_map.json, an explicit pad
    both = write_byte_bpe(tmp_path / "map", pad_token="<|im_end|>")
    (both / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": {"content": "<|im_end|>"}}))
    tok = PretrainedTokenizer.load(both)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot + 1, eot, eot + 1)
    # only generation_config.json names the EOS (a list: the first)
    gen = write_byte_bpe(tmp_path / "gen")
    (gen / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot + 1, eot]}))
    assert PretrainedTokenizer.load(gen).eos_id == eot + 1
    with pytest.raises(UserError, match="has no EOS token") as error:
        PretrainedTokenizer.load(write_byte_bpe(tmp_path / "none"))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="eos_token '<nope>' of .*tokenizer_config.json' is not in the tokenizer"):
        PretrainedTokenizer.load(write_byte_bpe(tmp_path / "bad", eos_token="<nope>"))


def test_sentencepiece_special_ids_llama_and_t5(llama_model, t5_model, tmp_path):
    llama = PretrainedTokenizer.load(llama_model)
    assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, 2), "no pad -> the EOS"
    assert llama.vocab_size == 400 and llama.backend_kind == "sentencepiece"
    t5 = PretrainedTokenizer.load(t5_model)
    assert (t5.pad_id, t5.eos_id, t5.unk_id, t5.bos_id) == (0, 1, 2, 1), "no BOS -> the EOS"
    # a tokenizer_config.json beside the model overrides the model's own ids
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(llama_model.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<unk>"}))
    assert PretrainedTokenizer.load(directory).pad_id == 0


@pytest.mark.parametrize("kind", ["json", "llama", "t5"])
def test_encode_adds_no_specials_and_decode_skips_them(kind, qwen_dir, llama_model, t5_model):
    tok = PretrainedTokenizer.load({"json": qwen_dir, "llama": llama_model, "t5": t5_model}[kind])
    text = "def f(x):\n    return x + 12345  # naïve café, 日本語 🙂"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids and ids
    expected = " ".join(text.split()) if kind == "t5" else text  # T5 removes extra whitespace, newlines included
    assert tok.decode(ids) == expected
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == expected
    assert tok.encode_batch([text, "", "ab"]) == [ids, tok.encode(""), tok.encode("ab")]


def test_save_load_gives_back_the_same_tokenizer(qwen_dir, llama_model, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    for source in (qwen_dir / "tokenizer.json", qwen_dir / "tokenizer_config.json", llama_model):
        (both / source.name).write_bytes(source.read_bytes())
    (both / "config.json").write_text("{}")  # a model file: not a tokenizer file, not copied
    tok = PretrainedTokenizer.load(both)
    assert tok.backend_kind == "tokenizer.json", "tokenizer.json is preferred when both are there"
    tok.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"])
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (both / name).read_bytes()
    again = PretrainedTokenizer.load(tmp_path / "saved")
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode(HARD) == tok.encode(HARD)
    # one file in, a directory out; saving over an existing directory replaces it whole
    PretrainedTokenizer.load(llama_model).save(tmp_path / "saved")
    assert [p.name for p in (tmp_path / "saved").iterdir()] == ["tokenizer.model"]
    assert PretrainedTokenizer.load(tmp_path / "saved").encode(HARD) == PretrainedTokenizer.load(llama_model).encode(
        HARD)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directories left"


def test_bad_paths_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "tokenizer.json").write_text("{not json")
    (tmp_path / "bad_model").mkdir()
    (tmp_path / "bad_model" / "tokenizer.model").write_bytes(b"\x00not a model")
    (tmp_path / "bad_config").mkdir()
    write_byte_bpe(tmp_path / "bad_config")
    (tmp_path / "bad_config" / "tokenizer_config.json").write_text("[1, 2")
    cases = {"missing": "does not exist", "empty": "holds neither tokenizer.json nor tokenizer.model",
             "bad_json": "tokenizer.json that does not load", "bad_model": "tokenizer.model that does not load",
             "bad_config": "tokenizer_config.json that is not JSON"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as error:
            PretrainedTokenizer.load(tmp_path / name)
        assert "\n" not in str(error.value) and str(tmp_path / name) in str(error.value)
    with pytest.raises(UserError, match="is a config, not a tokenizer"):
        PretrainedTokenizer.load(tmp_path / "bad_config" / "tokenizer_config.json")
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_any_tokenizer(tmp_path / "empty")


def test_load_any_tokenizer_reads_what_a_workdir_holds(ours, qwen_dir, tmp_path):
    ours.save(tmp_path / "sp" / "tokenizer.model")
    ByteTokenizer(num_reserved_ids=3).save(tmp_path / "byte" / "tokenizer.model")
    PretrainedTokenizer.load(qwen_dir).save(tmp_path / "pre" / "tokenizer")
    assert load_any_tokenizer(tmp_path / "sp").encode(HARD) == ours.encode(HARD)
    assert load_any_tokenizer(tmp_path / "byte").vocab_size == 263
    pretrained = load_any_tokenizer(tmp_path / "pre")
    assert isinstance(pretrained, PretrainedTokenizer) and pretrained.eos_id == 400
    assert isinstance(load_any_tokenizer(tmp_path / "pre" / "tokenizer"), PretrainedTokenizer)
    assert isinstance(load_any_tokenizer(tmp_path / "sp" / "tokenizer.model"), Tokenizer)
    # what load_trained_model reads, for each data.tokenizer
    from lm_core.run_config import default_config
    from lm_core.run_data import run_tokenizer

    config = default_config()
    assert run_tokenizer(config, tmp_path / "sp").encode(HARD) == ours.encode(HARD)
    config.data.tokenizer = "byte"
    byte = run_tokenizer(config, tmp_path / "byte")
    assert isinstance(byte, ByteTokenizer) and byte.num_reserved_ids == 3  # the run's own, reserved ids kept
    assert run_tokenizer(config, tmp_path / "new").vocab_size == 260  # a byte run that saved nothing yet
    config.data.tokenizer = "pretrained"
    assert run_tokenizer(config, tmp_path / "pre").files == pretrained.files
    with pytest.raises(UserError, match="has no tokenizer/ and data.tokenizer_path is empty"):
        run_tokenizer(config, tmp_path / "sp")


# --- export to transformers.AutoTokenizer -----------------------------------------------------------------------


def assert_hf_matches(tokenizer, directory: Path, texts: list[str]) -> transformers.PreTrainedTokenizerBase:
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tokenizer.bos_id, tokenizer.eos_id,
                                                                   tokenizer.pad_id)
    assert len(hf) == tokenizer.vocab_size
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), text
    assert hf.model_max_length == 256
    return hf


def export(tokenizer, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    out.mkdir()
    export_hf_tokenizer(tokenizer, out, model_max_length=256)
    return out


@pytest.mark.parametrize("reserved", [False, True])
def test_our_tokenizer_exports_exactly(ours, ours_reserved, tmp_path, reserved):
    tokenizer = ours_reserved if reserved else ours
    out = export(tokenizer, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                                     "tokenizer_config.json"]
    hf = assert_hf_matches(tokenizer, out, [HARD, HARD + SPECIALS_IN_TEXT, *HARD.split("\n"), CORPUS[-1]])
    assert hf(VIETNAMESE)["input_ids"] == [tokenizer.bos_id, *tokenizer.encode(VIETNAMESE)], "BOS first, as trained"
    for i in tokenizer.reserved_range:
        assert hf.convert_ids_to_tokens(i) == f"<reserved_{i - tokenizer.reserved_range.start}>"
    assert hf.decode([*tokenizer.encode("ok"), *tokenizer.reserved_range], skip_special_tokens=True) == "ok"


def test_byte_tokenizer_exports_exactly(tmp_path):
    tokenizer = ByteTokenizer(num_reserved_ids=2)
    hf = assert_hf_matches(tokenizer, export(tokenizer, tmp_path), [HARD, HARD + SPECIALS_IN_TEXT, "", " "])
    assert hf.convert_ids_to_tokens(261) == "<reserved_1>" and hf("é")["input_ids"] == [2, 0xC3 + 4, 0xA9 + 4]


@pytest.mark.parametrize("kind", ["json", "llama", "t5"])
def test_pretrained_tokenizers_export_exactly(kind, qwen_dir, llama_model, t5_model, tmp_path):
    tokenizer = PretrainedTokenizer.load({"json": qwen_dir, "llama": llama_model, "t5": t5_model}[kind])
    out = export(tokenizer, tmp_path)
    # A unigram lattice holds every piece: there "</s>" written in the text is the EOS (sentencepiece_to_tokenizers).
    specials = "" if kind == "t5" else SPECIALS_IN_TEXT + "<|endoftext|>"
    assert_hf_matches(tokenizer, out, [HARD, HARD + specials, *HARD.split("\n")])
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_the_sentencepiece_conversion_follows_user_defined_symbols(tmp_path):
    model = train_sentencepiece(tmp_path / "m.model", model_type="bpe", user_defined_symbols=["<image>", "<a b>"],
                                normalization_rule_name="nfkc", remove_extra_whitespaces=False)
    tokenizer = PretrainedTokenizer.load(model)
    texts = ["x<image>y <image> <a b>z", "<image><image>", "  <image>", HARD]
    assert tokenizer.encode("<image>")[1:] == [tokenizer.piece_to_id("<image>")]  # after the dummy prefix
    assert_hf_matches(tokenizer, export(tokenizer, tmp_path), texts)


def test_an_unsupported_tokenizer_is_refused(tmp_path):
    with pytest.raises(UserError, match="cannot export a str"):
        export_hf_tokenizer("tokenizer", tmp_path, model_max_length=8)
    model = train_sentencepiece(tmp_path / "w.model", model_type="word")
    with pytest.raises(UserError, match="cannot convert a sentencepiece WORD model"):
        hf_tokenizer.sentencepiece_to_tokenizers(model.read_bytes())


# --- the trainer ------------------------------------------------------------------------------------------------


def pretrained_run(tokenizer_path: str):
    from lm_core.run_config import default_config

    config = default_config()
    config.data.update(source="builtin", tokenizer="pretrained", tokenizer_path=tokenizer_path, seq_len=32,
                       global_batch_size=8)
    config.model.update(vocab_size=416, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                        max_seq_len=64)
    config.update(steps=3, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0)
    config.optimizer.update(warmup_steps=1)
    return config


@pytest.mark.slow
def test_training_with_a_pretrained_tokenizer_keeps_its_files_and_ids(qwen_dir, llama_model, tmp_path):
    from experiments.kv_prediction.task import check_same_tokenizer
    from lm_core import run_data
    from lm_core.run_config import model_config_from
    from lm_core.trained_runs import load_trained_model
    from lm_core.trainer import train

    config = pretrained_run(str(qwen_dir))
    result = train(config, tmp_path / "run")
    assert result.step == 3
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == (qwen_dir / name).read_bytes()
    assert not (tmp_path / "run" / "tokenizer.model").exists()
    _, tokenizer, step = load_trained_model(tmp_path / "run")
    source = PretrainedTokenizer.load(qwen_dir)
    assert isinstance(tokenizer, PretrainedTokenizer) and step == 3
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (400, 400, 400, 402)
    assert tokenizer.encode(HARD) == source.encode(HARD)
    config.data.tokenizer_path = str(llama_model)  # a resume reads the workdir's copy, whatever the path says now
    resumed = run_data.train_or_reuse_tokenizer(config, tmp_path / "run", [], model_config_from(config))
    assert resumed.files == source.files
    check_same_tokenizer(tmp_path / "run", tmp_path / "run")
    ByteTokenizer().save(tmp_path / "byte_run" / "tokenizer.model")
    with pytest.raises(UserError, match="different tokenizer than the base"):
        check_same_tokenizer(tmp_path / "run", tmp_path / "byte_run")


def test_a_pretrained_run_without_a_tokenizer_path_is_refused(tmp_path):
    from lm_core.run_config import validate_run_config
    from lm_core.trainer import train

    with pytest.raises(UserError, match="data.tokenizer=pretrained needs data.tokenizer_path") as error:
        validate_run_config(pretrained_run(""))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        train(pretrained_run(str(tmp_path / "missing")), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused before anything is written"
