"""The grain pipeline of a prepared dataset (lm_core.data.grain_pipeline): the batches, host rows and saved
positions of `PreparedTokensLoader`, built per host by random access, and the pair-position bookkeeping by hand."""

from __future__ import annotations

import copy
import re

import ml_collections
import numpy as np
import pytest

from lm_core.data.grain_pipeline import GrainPackedLoader, PairIndex, pack_pieces, pair_counts, training_stream
from lm_core.data.packing import PackCursor
from lm_core.data.prepared import PreparedDataset, PreparedTokensLoader, open_prepared
from lm_core.errors import UserError
from tests.test_prepare_data import bpe, corpus, dataset  # noqa: F401  (module fixtures: a small prepared dataset)


def same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    return got.keys() == expected.keys() and all(
        got[key].dtype == expected[key].dtype and np.array_equal(got[key], expected[key]) for key in expected)


def test_pair_positions_by_hand():
    # documents of 3, 1 and 2 pairs, visited in order 0 1 2 | 0 1 2 ...: 6 pairs per epoch
    index = PairIndex(np.array([3, 1, 2]), seed=0, shuffle=False)
    assert index.position(PackCursor(0, 0)) == 0 and index.position(PackCursor(2, 1)) == 5
    assert index.position(PackCursor(4, 0)) == 9  # epoch 1, document 1: 6 + 3
    assert index.cursor(3) == PackCursor(1, 0)  # a row ending exactly at a document's end continues at the next
    assert index.cursor(6) == PackCursor(3, 0) and index.cursor(8) == PackCursor(3, 2)
    assert index.pieces(2, 5) == [(0, 2, 1), (1, 0, 1), (2, 0, 2), (0, 0, 1)]  # across the epoch boundary


def test_pair_counts_are_tokens_plus_bos_and_eos_minus_one_with_or_without_a_lengths_file(bpe, dataset):  # noqa: F811
    data = open_prepared(dataset)
    split = data.split("train")
    expected = [len(ids) + 1 for ids, _ in split.read(range(len(split)))]
    assert split.lengths() is not None and pair_counts(split).tolist() == expected
    manifest = copy.deepcopy(data.manifest)
    del manifest["splits"]["train"]["lengths"]  # a dataset prepared before lengths files: read through once
    older = PreparedDataset(data.directory, manifest).split("train")
    assert older.lengths() is None and pair_counts(older).tolist() == expected


def test_loader_and_prefetch_threads_from_the_config_and_bad_values_in_one_line(bpe, dataset):  # noqa: F811
    split = open_prepared(dataset).split("train")
    data = ml_collections.ConfigDict(dict(seq_len=16, global_batch_size=2, loader="grain", whole_documents=False))
    options = dict(seed=0, process_index=0, process_count=1)
    assert isinstance(training_stream(split, bpe[0], data, **options), GrainPackedLoader)
    assert training_stream(split, bpe[0], data, **options)._threads == 0  # no loader_threads: none on a CPU backend
    data.loader_threads = 1
    assert training_stream(split, bpe[0], data, **options)._threads == 1
    data.loader = "stream"
    assert type(training_stream(split, bpe[0], data, **options)) is PreparedTokensLoader
    for changes, fragment in [(dict(loader="tf.data"), "data.loader='tf.data' is not a loader; valid: grain, stream"),
                              (dict(loader="grain", loader_threads=-2),
                               "data.loader_threads=-2 is invalid; valid: an integer >= 0"),
                              (dict(loader_threads=-1, loader="grain", whole_documents=True),
                               "valid: data.loader=stream")]:
        data.update(changes)
        with pytest.raises(UserError, match=re.escape(fragment)):
            training_stream(split, bpe[0], data, **options)


@pytest.mark.parametrize(("process_count", "threads"), [(1, 2), (2, 2), (1, 0)])
def test_batches_and_positions_equal_the_prepared_loaders_over_several_epochs(bpe, dataset, process_count,  # noqa: F811
                                                                              threads):
    tokenizer, split = bpe[0], open_prepared(dataset).split("train")
    options = dict(seq_len=48, global_batch_size=4, seed=5, process_count=process_count)
    for host in range(process_count):
        reference = PreparedTokensLoader(split, tokenizer, process_index=host, **options)
        loader = GrainPackedLoader(split, tokenizer, process_index=host, threads=threads, **options)
        for _ in range(30):  # the corpus's 33 documents are a few batches: many epochs
            assert same(loader.next(), reference.next())
            assert loader.state() == reference.state()


def test_a_saved_position_resumes_exactly_on_either_loader_and_another_host_count(bpe, dataset):  # noqa: F811
    tokenizer, split = bpe[0], open_prepared(dataset).split("train")
    options = dict(seq_len=40, global_batch_size=4, seed=3)
    reference = PreparedTokensLoader(split, tokenizer, **options)
    batches = [reference.next() for _ in range(12)]
    two_hosts = [GrainPackedLoader(split, tokenizer, process_index=h, process_count=2, **options) for h in (0, 1)]
    for _ in range(5):
        halves = [host.next() for host in two_hosts]
    assert two_hosts[0].state() == two_hosts[1].state()
    one_host = GrainPackedLoader(split, tokenizer, **options)
    one_host.restore(two_hosts[0].state())  # 2 hosts -> 1
    for expected in batches[5:8]:
        assert same(one_host.next(), expected)
    stream = PreparedTokensLoader(split, tokenizer, process_index=1, process_count=2, **options)
    stream.restore(one_host.state())  # grain -> the in-process stream, 1 host -> 2
    assert same(stream.next(), {key: value[2:] for key, value in batches[8].items()})
    assert all(halves[h][key].shape[0] == 2 for h in (0, 1) for key in halves[h])


def test_worker_processes_give_the_same_batches(bpe, dataset):  # noqa: F811
    tokenizer, split = bpe[0], open_prepared(dataset).split("train")
    options = dict(seq_len=32, global_batch_size=2, seed=1)
    reference = PreparedTokensLoader(split, tokenizer, **options)
    loader = GrainPackedLoader(split, tokenizer, workers=2, **options)
    for _ in range(6):
        assert same(loader.next(), reference.next())


def test_pieces_pack_into_rows_by_hand():
    # Document 0: BOS 5 6 EOS (3 pairs, 4 characters); document 1: BOS 7 EOS (2 pairs, 3 characters). Pairs 1-2 of
    # document 0, both of document 1, then pairs 0-1 of document 0 again, in 2 rows of 3: document 1 is cut by the
    # row end and continues as row 1's first segment.
    documents = [(np.array([5, 6]), 4), (np.array([7]), 3), (np.array([5, 6]), 4)]
    batch = pack_pieces([(0, 1, 2), (1, 0, 2), (0, 0, 2)], documents, 2, 3, bos_id=1, eos_id=2)
    assert batch["inputs"].tolist() == [[5, 6, 1], [7, 1, 5]]
    assert batch["targets"].tolist() == [[6, 2, 7], [2, 5, 6]]
    assert batch["segment_ids"].tolist() == [[1, 1, 2], [1, 2, 2]]
    assert batch["positions"].tolist() == [[0, 1, 0], [0, 0, 1]]
    # shares of 4 chars over 3 pairs: 1, 1, 2; of 3 chars over 2 pairs: 1, 2
    assert batch["chars"].tolist() == [1 + 2 + 1, 2 + 1 + 1] and batch["loss_mask"].min() == 1.0
