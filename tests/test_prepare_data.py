"""Pre-tokenised datasets: experiments.prepare_data's shards, PreparedTokensLoader against LMDataLoader, training on
`tokens:DIR` (and resuming), tokenizer mismatches and bad input refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from lm_core.data import LMDataLoader, get_text_source, iter_eval_batches
from lm_core.data import prepared as prepared_lib
from lm_core.data.prepared import PreparedTokensLoader, iter_prepared_eval_batches, open_prepared, prepare
from lm_core.errors import UserError
from lm_core.tokenizer import ByteTokenizer, Tokenizer, TokenizerSpec, train_tokenizer
from tests.helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """40 documents of very different lengths (Python's own help topics) as a files: source."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in sorted(topics)[:40]:
        (folder / f"{name}.txt").write_text(topics[name])
    return f"files:{folder}/*.txt"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus) -> tuple[Tokenizer, Path]:
    """A small BPE trained on the corpus, saved as a file prepare_data can be pointed at."""
    texts = get_text_source(corpus).split("train")
    tokenizer = train_tokenizer(list(texts), TokenizerSpec(vocab_size=400), tmp_path_factory.mktemp("cache"))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    tokenizer.save(path)
    return tokenizer, path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus, bpe) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    prepare(corpus, str(bpe[1]), out, workers=1, docs_per_shard=7)
    return out


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.array_record"))}


def test_shards_decode_to_the_tokenizers_encoding_in_order_and_any_worker_count_writes_the_same(
        tmp_path, corpus, bpe, dataset):
    tokenizer = bpe[0]
    source = get_text_source(corpus)
    data = open_prepared(f"tokens:{dataset}")
    for name in ("train", "validation"):
        texts, split = source.split(name), data.split(name)
        documents = split.read(range(len(split)))
        assert len(documents) == len(texts)
        for text, (ids, chars) in zip(texts, documents, strict=True):
            assert ids.tolist() == tokenizer.encode(text) and chars == len(text)
        info = data.manifest["splits"][name]
        assert info["documents"] == len(texts) and info["characters"] == sum(len(t) for t in texts)
        assert info["tokens"] == sum(len(ids) for ids, _ in documents)
        assert [shard["documents"] for shard in info["shards"]] == [
            min(7, len(texts) - start) for start in range(0, len(texts), 7)]
    manifest = data.manifest
    assert (manifest["vocab_size"], manifest["bos_id"], manifest["eos_id"]) == (400, 2, 3)
    assert manifest["tokenizer"]["fingerprint"] == prepared_lib.tokenizer_fingerprint(tokenizer)
    assert manifest["tokenizer"]["origin"] == str(bpe[1]) and manifest["source"] == corpus
    assert (dataset / "tokenizer" / "tokenizer.model").read_bytes() == tokenizer.model_proto
    parallel = tmp_path / "parallel"
    prepare(corpus, str(bpe[1]), parallel, workers=2, docs_per_shard=7)
    assert shard_bytes(parallel) == shard_bytes(dataset) and len(shard_bytes(dataset)) > 2
    assert json.loads((parallel / "manifest.json").read_text()) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["parallel"]  # the staging directory is gone


def test_every_compression_reads_back_the_same_documents_and_the_manifest_names_it(tmp_path, corpus, bpe, dataset):
    plain = open_prepared(dataset)
    assert plain.manifest["compression"] == "none"  # the default: the fastest to read
    expected = plain.split("train").read(range(len(plain.split("train"))))
    for compression in ("zstd", "snappy"):
        out = tmp_path / compression
        prepare(corpus, str(bpe[1]), out, docs_per_shard=7, compression=compression)
        data = open_prepared(out)
        assert data.manifest["compression"] == compression
        documents = data.split("train").read(range(len(data.split("train"))))
        assert [(ids.tolist(), chars) for ids, chars in documents] == [(ids.tolist(), c) for ids, c in expected]
        assert sum(map(len, shard_bytes(out).values())) < sum(map(len, shard_bytes(dataset).values()))
    with pytest.raises(UserError, match=r"^compression='gzip' is not one; valid: none, zstd, snappy$"):
        prepare(corpus, str(bpe[1]), tmp_path / "gzip", compression="gzip")
    assert not (tmp_path / "gzip").exists()


@pytest.mark.parametrize("whole_documents", [False, True])
def test_loader_batches_equal_the_text_loaders_and_resume_exactly(corpus, bpe, dataset, whole_documents):
    tokenizer = bpe[0]
    texts = get_text_source(corpus).split("train")
    split = open_prepared(dataset).split("train")
    options = dict(seq_len=48, global_batch_size=4, seed=5, whole_documents=whole_documents)
    reference = LMDataLoader(texts, tokenizer, **options)
    loader = PreparedTokensLoader(split, tokenizer, **options)
    batches = [reference.next() for _ in range(30)]  # several epochs of 33 documents
    for expected in batches[:20]:
        got = loader.next()
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and np.array_equal(got[key], expected[key]), key
    resumed = PreparedTokensLoader(open_prepared(dataset).split("train"), tokenizer, **options)
    resumed.restore(loader.state())
    from_text = PreparedTokensLoader(split, tokenizer, **options)
    text_state = LMDataLoader(texts, tokenizer, **options)
    for _ in range(20):
        text_state.next()
    from_text.restore(text_state.state())  # a text run's position continues on its prepared tokens
    for expected in batches[20:]:
        for stream in (resumed, from_text):
            got = stream.next()
            assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_eval_batches_and_host_rows_equal_the_text_loaders(corpus, bpe, dataset):
    tokenizer = bpe[0]
    source, data = get_text_source(corpus), open_prepared(dataset)
    ours = list(iter_prepared_eval_batches(data.split("validation"), tokenizer, 32, 4))
    theirs = list(iter_eval_batches(source.split("validation"), tokenizer, 32, 4))
    assert len(ours) == len(theirs) > 0
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(ours, theirs, strict=True) for k in a)
    options = dict(seq_len=32, global_batch_size=4, seed=1, process_index=1, process_count=2)
    host = PreparedTokensLoader(data.split("train"), tokenizer, **options).next()
    text_host = LMDataLoader(source.split("train"), tokenizer, **options).next()
    assert all(np.array_equal(host[k], text_host[k]) for k in host)


def test_another_tokenizer_or_dataset_is_refused_in_one_line(tmp_path, corpus, bpe, dataset):
    split = open_prepared(dataset).split("train")
    with pytest.raises(UserError, match="was prepared with another tokenizer") as refused:
        PreparedTokensLoader(split, ByteTokenizer(), seq_len=32, global_batch_size=4, seed=0)
    message = str(refused.value)
    assert "\n" not in message and prepared_lib.tokenizer_fingerprint(ByteTokenizer())[:16] in message
    assert prepared_lib.tokenizer_fingerprint(bpe[0])[:16] in message and "prepare_data" in message
    # a position saved on one prepared dataset does not resume on another
    other = tmp_path / "other"
    prepare(corpus, "byte", other, docs_per_shard=100)
    state = PreparedTokensLoader(split, bpe[0], seq_len=32, global_batch_size=4, seed=0).state()
    byte_loader = PreparedTokensLoader(open_prepared(other).split("train"), ByteTokenizer(), seq_len=32,
                                       global_batch_size=4, seed=0)
    with pytest.raises(UserError, match="saved for a different stream.*tokenizer_fingerprint"):
        byte_loader.restore(state)
    # an explicit data.tokenizer that is not the dataset's is refused before a run starts
    config = tiny_run(tmp_path)
    config.data.source = f"tokens:{dataset}"
    with pytest.raises(UserError, match="data.tokenizer=byte has fingerprint"):
        prepared_lib.run_config(config, open_prepared(dataset))


def test_run_config_names_the_datasets_tokenizer(tmp_path, bpe, dataset):
    config = tiny_run(tmp_path)
    byte_dataset = tmp_path / "bytes"
    prepare(config.data.source, "byte", byte_dataset)
    kinds = [(dataset, "sentencepiece"), (byte_dataset, "byte")]
    if _has_tokenizers():  # a pretrained tokenizer directory (tokenizer.json + configs) is copied whole
        from lm_core.hf_tokenizer import export_hf_tokenizer

        (tmp_path / "hf").mkdir()
        export_hf_tokenizer(bpe[0], tmp_path / "hf", model_max_length=64)
        prepare(config.data.source, str(tmp_path / "hf"), tmp_path / "pretrained")
        kinds.append((tmp_path / "pretrained", "pretrained"))
    config.data.tokenizer = "sentencepiece"  # the default: the dataset decides
    for data, kind in kinds:
        config.data.source = f"tokens:{data}"
        resolved = prepared_lib.run_config(config, open_prepared(data))
        assert resolved.data.tokenizer == kind
        if kind == "pretrained":
            assert resolved.data.tokenizer_path == str(data / "tokenizer")
            assert open_prepared(data).load_tokenizer().encode("print(x)") == bpe[0].encode("print(x)")
    assert config.data.tokenizer == "sentencepiece"  # a copy: the caller's config is unchanged


def _has_tokenizers() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def test_train_lm_on_tokens_trains_resumes_and_refuses_a_dataset_of_another_tokenizer(tmp_path):
    from experiments.train_lm import task_for
    from lm_core.metrics import read_metrics
    from lm_core.run_data import run_tokenizer
    from lm_core.trainer import train

    # a byte-level model on a files: corpus (each train() compiles for ~10 s, so: 2 steps, then 1 more)
    config = tiny_run(tmp_path, steps=2, eval_every=2, eval_batches=1, checkpoint_every=2)
    data = tmp_path / "tokens"
    prepare(config.data.source, "byte", data, docs_per_shard=5)
    config.data.update(source=f"tokens:{data}", tokenizer="sentencepiece")  # the default: the dataset decides
    workdir = tmp_path / "run"
    run_config, task = task_for(config)
    assert train(run_config, workdir, task).step == 2
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "byte" and saved["data"]["source"] == f"tokens:{data}"
    assert isinstance(run_tokenizer(run_config, workdir), ByteTokenizer)  # what sample / export_hf load
    config.steps = 3
    run_config, task = task_for(config)
    assert train(run_config, workdir, task).step == 3
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert any("eval_loss" in row for row in rows)
    # the same run on a dataset of another tokenizer (same vocabulary size): refused before anything is written
    ByteTokenizer(num_reserved_ids=4).save(tmp_path / "byte4.model")
    other = tmp_path / "tokens4"
    prepare(f"files:{tmp_path}/corpus/*.txt", str(tmp_path / "byte4.model"), other)
    config.update(steps=4)
    config.data.source = f"tokens:{other}"
    before = sorted(p.name for p in workdir.rglob("*"))
    run_config, task = task_for(config)
    with pytest.raises(UserError, match=f"tokens:{other} was prepared with another tokenizer") as refused:
        train(run_config, workdir, task)
    assert "\n" not in str(refused.value) and "new --workdir" in str(refused.value)
    assert sorted(p.name for p in workdir.rglob("*")) == before


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


BAD_INPUTS = [
    ("missing source", ["--source=files:{tmp}/nothing/*.txt", "--tokenizer=byte", "--out={tmp}/out"],
     "matches no files"),
    ("unknown source", ["--source=nonsense:x", "--tokenizer=byte", "--out={tmp}/out"], "unknown text source"),
    ("existing out", ["--source=files:{tmp}/corpus/*.txt", "--tokenizer=byte", "--out={tmp}/corpus"],
     "exists and is not an empty directory"),
    ("no workers", ["--source=files:{tmp}/corpus/*.txt", "--tokenizer=byte", "--out={tmp}/out", "--workers=0"],
     "workers=0 is invalid"),
    ("missing tokenizer", ["--source=files:{tmp}/corpus/*.txt", "--tokenizer={tmp}/no_run", "--out={tmp}/out"],
     "no_run' does not exist"),
    ("bad compression", ["--source=files:{tmp}/corpus/*.txt", "--tokenizer=byte", "--out={tmp}/out",
                         "--compression=gzip"], "gzip"),
]


@pytest.mark.parametrize(("name", "arguments", "fragment"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(tmp_path, name, arguments, fragment):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one document\n\nand another")
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "experiments.prepare_data",
                           *(a.format(tmp=tmp_path) for a in arguments)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and fragment in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before
