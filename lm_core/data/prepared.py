"""Pre-tokenised datasets (`tokens:DIR`): a text source tokenised once, then read back by random access for training.

`prepare` (what `python -m experiments.prepare_data` runs) tokenises every document of a text source's train and
validation splits in worker processes, each writing whole shards of a contiguous range of documents:
    DIR/manifest.json        format and version, the source spec, the tokenizer (fingerprint, kind, where it came
                             from), vocab_size, bos/eos ids, the token dtype and, per split, its documents, tokens
                             (without BOS/EOS), characters, content digest, shard files and their document counts
    DIR/tokenizer/           a copy of the tokenizer's files: a run on DIR loads this one
    DIR/<split>-00000-of-0000n.array_record    one record per document, in the source's order
It is staged in a temporary sibling directory renamed to DIR at the end, so an interrupted run leaves no DIR. A
record is the document's character count (uint64) and its token ids (little-endian `token_dtype`: uint16 when the
vocabulary fits, else int32), stored uncompressed unless `compression` asks for zstd or snappy (the manifest says
which). Shard boundaries depend only on `docs_per_shard`, so any number of workers writes the same bytes.

`PreparedTokensLoader` packs these documents exactly as `LMDataLoader` packs the text they came from: same seed,
same batches, byte for byte, and the same saved position (the manifest records the text loader's content digest of
each split), so a run can move from a text source to its prepared tokens and continue. It holds only the documents
the next batches need (_READ_AHEAD of them), so memory does not grow with the corpus.

The tokenizer fingerprint is the sha256 of the tokenizer's serialized files. A dataset is read only with the
tokenizer it was prepared with (another is refused in one line), and the loader's saved position names the dataset
(content digest) and the tokenizer (fingerprint), so a resume on another prepared dataset is refused too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import itertools
import json
import multiprocessing
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lm_core import hf_tokenizer
from lm_core import tokenizer as tok
from lm_core.data.loader import content_digest
from lm_core.data.packing import TokenizedDocument, tokenized_document
from lm_core.data.sources import TextSource, get_text_source
from lm_core.data.stream import PackedStream, check_positive
from lm_core.errors import UserError, brief
from lm_core.staging import staged_directory

PREFIX = "tokens"
MANIFEST = "manifest.json"
TOKENIZER_DIRNAME = "tokenizer"
FORMAT = "lm_core.prepared_tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DEFAULT_DOCS_PER_SHARD = 10_000
_RECORD_HEADER = struct.Struct("<Q")  # the document's character count, then its token ids
# One record per chunk: reading a document reads that document only (random access, as TFDS writes them). Chunks
# are written uncompressed by default: token ids compress ~1.8x (zstd, BPE ids of the builtin corpus), but a
# zstd record takes ~9 us to read where an uncompressed one takes ~3.5 us, and the input pipeline's CPU is what
# feeds the devices (benchmarks/data.py). `prepare(compression=...)` trades that for disk.
COMPRESSIONS = {"none": "uncompressed", "zstd": "zstd:3", "snappy": "snappy"}  # name -> ArrayRecord option
_READER_OPTIONS = "readahead_buffer_size:0"  # no sequential read-ahead: documents are read by index
_OPEN_READERS = 8  # shard readers a split keeps open, the least recently used closed first
_READ_AHEAD = 128  # documents a loader reads in one call per shard, and all it holds
_ENCODE_CHUNK = 256  # documents per encode_batch call (sentencepiece's threads)
_VALID_DIR = "valid: a directory written by python -m experiments.prepare_data"

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer identity


def tokenizer_kind(tokenizer: Any) -> str:
    """The `data.tokenizer` that reloads `tokenizer` from a run's workdir: sentencepiece, byte or pretrained."""
    if isinstance(tokenizer, hf_tokenizer.PretrainedTokenizer):
        return "pretrained"
    if isinstance(tokenizer, tok.ByteTokenizer):
        return "byte"
    if isinstance(tokenizer, tok.Tokenizer):
        return "sentencepiece"
    raise UserError(f"a {type(tokenizer).__name__} cannot be recorded in a prepared dataset; valid: a Tokenizer, "
                    "ByteTokenizer or PretrainedTokenizer")


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's serialized files by name: what DIR/tokenizer/ holds and what the fingerprint hashes."""
    kind = tokenizer_kind(tokenizer)
    if kind == "pretrained":
        return tokenizer.files
    return {tok.MODEL_FILENAME: tokenizer.model_bytes if kind == "byte" else tokenizer.model_proto}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of the tokenizer's files and their names: equal in every process and for every copy."""
    digest = hashlib.sha256()
    for name, data in sorted(tokenizer_files(tokenizer).items()):
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def load_tokenizer_copy(directory: Path, kind: str) -> Any:
    """The tokenizer whose files `tokenizer_files` wrote into `directory`."""
    if kind == "pretrained":
        return hf_tokenizer.PretrainedTokenizer.load(directory)
    return tok.load_tokenizer(directory / tok.MODEL_FILENAME)


def load_source_tokenizer(spec: str) -> Any:
    """What `--tokenizer` names: `byte`, a run's workdir, a tokenizer directory, or a tokenizer.model / .json file."""
    if spec == "byte":
        return tok.ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer '{spec}' does not exist; valid: byte, a run's workdir, a tokenizer directory, "
                        "or a tokenizer.model / tokenizer.json file")
    if path.is_file() and path.suffix == ".json":
        return hf_tokenizer.PretrainedTokenizer.load(path)
    return hf_tokenizer.load_any_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def is_prepared_source(spec: str) -> bool:
    return spec.partition(":")[0] == PREFIX


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset directory and its (checked) manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{PREFIX}:{self.directory}"

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def tokenizer_kind(self) -> str:
        return self.manifest["tokenizer"]["kind"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER_DIRNAME

    def split(self, name: str) -> PreparedSplit:
        if name not in self.manifest["splits"]:
            raise UserError(f"{self.name} has no split '{name}'; valid: {sorted(self.manifest['splits'])}")
        return PreparedSplit(self, name)

    def load_tokenizer(self) -> Any:
        """The dataset's copy of its tokenizer (checked against the manifest's fingerprint)."""
        tokenizer = load_tokenizer_copy(self.tokenizer_dir, self.tokenizer_kind)
        self.check_tokenizer(tokenizer, f"its copy in {self.tokenizer_dir}/",
                             remedy="prepare the dataset again (its tokenizer/ has been changed)")
        return tokenizer

    def check_tokenizer(self, tokenizer: Any, whose: str, remedy: str = "") -> None:
        """UserError unless `tokenizer` is the one the dataset was prepared with (its ids would mean other text)."""
        actual = tokenizer_fingerprint(tokenizer)
        if actual == self.fingerprint:
            return
        remedy = remedy or (f"the tokenizer it was prepared with (its copy in {self.tokenizer_dir}/), or a dataset "
                            "prepared with this one (python -m experiments.prepare_data --tokenizer=...)")
        raise UserError(f"{self.name} was prepared with another tokenizer: fingerprint {self.fingerprint[:16]} "
                        f"(from {self.manifest['tokenizer']['origin']}), but {whose} has fingerprint {actual[:16]}; "
                        f"valid: {remedy}")


def open_prepared(spec: str | os.PathLike) -> PreparedDataset:
    """`tokens:DIR` (or DIR), with its manifest checked."""
    text = os.fspath(spec)
    text = text.partition(":")[2] if is_prepared_source(text) else text
    if not text:
        raise UserError(f"'{PREFIX}:' names no directory; valid: {PREFIX}:DIR with DIR written by "
                        "python -m experiments.prepare_data")
    directory = Path(text).expanduser().absolute()
    path = directory / MANIFEST
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {MANIFEST}"
        raise UserError(f"prepared dataset {PREFIX}:{directory} {what}; {_VALID_DIR}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({brief(e)}); {_VALID_DIR}") from e
    problem = _manifest_problem(manifest, directory)
    if problem:
        raise UserError(f"{path} is not a usable prepared dataset manifest ({problem}); valid: prepare the dataset "
                        "again with python -m experiments.prepare_data")
    return PreparedDataset(directory, manifest)


_MANIFEST_TYPES = {"tokenizer": dict, "vocab_size": int, "bos_id": int, "eos_id": int, "token_dtype": str,
                   "splits": dict}


def _manifest_problem(manifest: Any, directory: Path) -> str:
    """What is wrong with a manifest ("" if nothing): the loader relies on every field it reads."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"format is not {FORMAT!r}"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    wrong = [key for key, kind in _MANIFEST_TYPES.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        return f"missing or mistyped {wrong}"
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer.get("fingerprint"), str) or tokenizer.get("kind") not in ("sentencepiece", "byte",
                                                                                           "pretrained"):
        return "tokenizer has no fingerprint or an unknown kind"
    if manifest["token_dtype"] not in ("<u2", "<i4"):
        return f"token_dtype {manifest['token_dtype']!r} is not <u2 or <i4"
    for name in SPLITS:
        problem = _split_problem(manifest["splits"].get(name), directory)
        if problem:
            return f"split {name}: {problem}"
    return ""


def _split_problem(split: Any, directory: Path) -> str:
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        return "missing, or has no shard list"
    try:
        counts = [int(shard["documents"]) for shard in split["shards"]]
        files = [str(shard["file"]) for shard in split["shards"]]
        if sum(counts) != int(split["documents"]) or min(counts, default=0) < 0:
            return f"shard document counts {counts} do not add up to {split['documents']}"
        int(split["content_digest"])
    except (KeyError, TypeError, ValueError) as e:
        return f"{type(e).__name__}: {brief(e)}"
    missing = [file for file in files if not (directory / file).is_file()]
    return f"missing shard files {missing[:3]}" if missing else ""


class PreparedSplit:
    """One split's documents by index (`len`, `read`), from its shards; at most _OPEN_READERS shards open at once."""

    def __init__(self, dataset: PreparedDataset, name: str):
        info = dataset.manifest["splits"][name]
        self.dataset = dataset
        self.name = name
        self.content_digest = int(info["content_digest"])
        self._files = [dataset.directory / shard["file"] for shard in info["shards"]]
        # shard s holds documents [starts[s], starts[s + 1])
        self._starts = np.cumsum([0, *(int(shard["documents"]) for shard in info["shards"])])  # [shards + 1]
        self._dtype = np.dtype(dataset.manifest["token_dtype"])
        self._readers: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray | None:
        """[documents] token counts (without BOS/EOS), or None for a dataset prepared before they were written."""
        name = self.dataset.manifest["splits"][self.name].get("lengths")
        if name is None:
            return None
        lengths = np.load(self.dataset.directory / name)
        if lengths.shape != (len(self),):
            raise UserError(f"{self.dataset.directory / name} holds {lengths.shape} lengths for {len(self)} "
                            "documents; valid: prepare the dataset again")
        return lengths

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """(token ids [m] without BOS/EOS, characters) of documents `indices`, in their order. The ids are a
        read-only view of the record in the dataset's `token_dtype` (uint16 or int32): every packer copies them
        into int32 rows anyway, so they are not converted twice.

        Shard by shard, one read call per record: ArrayRecord's many-index `read` hands the records to a thread
        pool, which for the tens of small records of a batch is no faster on an idle machine and ~1.7x slower
        when other threads keep the cores busy (measured on 2 cores next to a training job)."""
        positions = np.asarray(indices, np.int64)  # [n]
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"document indices {positions.min()}..{positions.max()} of a split of {len(self)}")
        shards = np.searchsorted(self._starts, positions, side="right") - 1  # [n]
        local = (positions - self._starts[shards]).tolist()
        documents: list[Any] = [None] * len(positions)
        shard, reader = -1, None
        for slot in np.argsort(shards, kind="stable").tolist():
            if shards[slot] != shard:
                shard = int(shards[slot])
                reader = self._reader(shard)
            documents[slot] = decode_record(reader.read([local[slot]])[0], self._dtype)
        return documents

    def _reader(self, shard: int) -> Any:
        from array_record.python.array_record_module import ArrayRecordReader

        if shard in self._readers:
            self._readers.move_to_end(shard)
        else:
            if len(self._readers) >= _OPEN_READERS:
                self._readers.popitem(last=False)[1].close()
            self._readers[shard] = ArrayRecordReader(os.fspath(self._files[shard]), _READER_OPTIONS)
        return self._readers[shard]

    def close(self) -> None:
        while self._readers:
            self._readers.popitem()[1].close()


def encode_record(ids: Sequence[int], chars: int, dtype: np.dtype | str) -> bytes:
    return _RECORD_HEADER.pack(int(chars)) + np.asarray(ids, dtype).tobytes()


def decode_record(record: bytes, dtype: np.dtype | str) -> tuple[np.ndarray, int]:
    """(token ids [m] as a read-only `dtype` view of `record`, characters)."""
    (chars,) = _RECORD_HEADER.unpack_from(record)
    return np.frombuffer(record, dtype, offset=_RECORD_HEADER.size), int(chars)


class PreparedTokensLoader(PackedStream):
    """`LMDataLoader`'s stream over a prepared split: the same batches from token ids read by random access.

    `tokenizer` is the run's; it must be the one the dataset was prepared with (refused in one line otherwise).
    """

    _resume_with = "the same prepared dataset (and tokenizer), seed and shuffle"

    def __init__(self, split: PreparedSplit, tokenizer: Any, *, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                 whole_documents: bool = False):
        if len(split) == 0:
            raise UserError(f"split '{split.name}' of {split.dataset.name} has no documents; valid: a split with at "
                            "least one document")
        split.dataset.check_tokenizer(tokenizer, "the given tokenizer")
        super().__init__(len(split), seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count, shuffle=shuffle,
                         repeat=repeat, whole_documents=whole_documents)
        self._split = split
        manifest = split.dataset.manifest
        self._vocab_size, self._bos_id, self._eos_id = manifest["vocab_size"], manifest["bos_id"], manifest["eos_id"]
        self._window: dict[int, TokenizedDocument] = {}  # document index -> tokens, the next stream documents only

    @property
    def num_documents(self) -> int:
        return self.num_items

    def _stream_identity(self) -> dict[str, int]:
        # LMDataLoader's fields (with its content digest, recorded at preparation) plus the tokenizer's fingerprint
        return {"seed": self._seed, "num_documents": self.num_documents, "shuffle": int(self._shuffle),
                "vocab_size": self._vocab_size, "content_digest": self._split.content_digest,
                "tokenizer_fingerprint": int(self._split.dataset.fingerprint[:12], 16)}

    def _document_at(self, stream_index: int) -> TokenizedDocument | None:
        located = self._epoch_and_item(stream_index)
        if located is None:
            return None
        if located[1] not in self._window:
            self._read_ahead(stream_index)
        return self._window[located[1]]

    def _read_ahead(self, stream_index: int) -> None:
        """Replace the window by the documents of the next _READ_AHEAD stream positions: packing only moves forward
        (and `restore` lands anywhere), so the documents before `stream_index` are not asked for again."""
        indices = self._unseen_items_ahead(stream_index, _READ_AHEAD, ())
        self._window = {index: tokenized_document(ids, chars, bos_id=self._bos_id, eos_id=self._eos_id)
                        for index, (ids, chars) in zip(indices, self._split.read(indices), strict=True)}


def iter_prepared_eval_batches(split: PreparedSplit, tokenizer: Any, seq_len: int, batch_size: int,
                               max_batches: int | None = None, *, process_index: int = 0,
                               process_count: int = 1) -> Iterator[Batch]:
    """`iter_eval_batches` of a prepared split: one pass in order, the last batch padded with loss_mask 0."""
    loader = PreparedTokensLoader(split, tokenizer, seq_len=seq_len, global_batch_size=batch_size, seed=0,
                                  process_index=process_index, process_count=process_count, shuffle=False,
                                  repeat=False)
    yield from itertools.islice(loader, max_batches)


# ---------------------------------------------------------------------------------------------------------------
# Training on a prepared dataset (experiments.train_lm wraps these into the trainer's TrainTask)


def run_config(config: Any, dataset: PreparedDataset) -> Any:
    """A copy of the run's config whose data.tokenizer (and data.tokenizer_path) name the dataset's tokenizer, so
    config.json says what the run used and `lm_core.run_data.run_tokenizer` reads the workdir's copy back.

    data.tokenizer=sentencepiece (the default: a BPE trained on the text, which a prepared dataset replaces by its
    own) becomes the dataset's kind; an explicit byte or pretrained tokenizer must be the dataset's (else refused).
    """
    kind, path = config.data.tokenizer, config.data.get("tokenizer_path", "")
    chosen = (tok.ByteTokenizer() if kind == "byte" and dataset.tokenizer_kind != "byte" else
              hf_tokenizer.PretrainedTokenizer.load(path) if kind == "pretrained" and path else None)
    if chosen is not None:
        dataset.check_tokenizer(chosen, f"data.tokenizer={kind}" + (f" ({path})" if path else ""),
                                remedy=f"leave data.tokenizer at its default with {PREFIX}: (the dataset's "
                                       "tokenizer is the run's), or prepare the data with this tokenizer")
    config = copy.deepcopy(config)
    config.data.tokenizer = dataset.tokenizer_kind
    if dataset.tokenizer_kind == "pretrained" and chosen is None:
        config.data.tokenizer_path = os.fspath(dataset.tokenizer_dir)
    return config


def run_tokenizer(dataset: PreparedDataset, workdir: str | os.PathLike) -> Any:
    """The run's tokenizer: the workdir's copy when it has one (a resumed run keeps the tokenizer it started with),
    else the dataset's; refused unless the dataset was prepared with it."""
    workdir = Path(workdir)
    if not hf_tokenizer.workdir_tokenizer_files(workdir):
        return dataset.load_tokenizer()
    saved = hf_tokenizer.load_any_tokenizer(workdir)
    dataset.check_tokenizer(saved, f"the run in {workdir}", remedy="train in a new --workdir, or prepare the data "
                            f"with this run's tokenizer (python -m experiments.prepare_data --tokenizer={workdir})")
    return saved


def training_data(dataset: PreparedDataset, config: Any, workdir: str | os.PathLike, model_vocab_size: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> tuple[Any, PreparedTokensLoader, list[Batch]]:
    """(tokenizer, training stream, evaluation batches) of a run on `dataset`: lm_core.run_data.TrainData's fields,
    as `text_train_data` makes them from a text source."""
    tokenizer = run_tokenizer(dataset, workdir)
    if tokenizer.vocab_size > model_vocab_size:
        raise UserError(f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of {dataset.name}'s "
                        f"tokenizer ({tokenizer.vocab_size}); use model.vocab_size >= {tokenizer.vocab_size}")
    from lm_core.data.grain_pipeline import training_stream  # it builds on this module

    data = config.data
    loader = training_stream(dataset.split("train"), tokenizer, data, seed=config.seed,
                             process_index=process_index, process_count=process_count)
    eval_batches = list(iter_prepared_eval_batches(dataset.split("validation"), tokenizer, data.seq_len,
                                                   data.global_batch_size, config.eval_batches))
    return tokenizer, loader, eval_batches


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    start: int  # documents [start, stop) of the split
    stop: int
    file: str


@dataclasses.dataclass(frozen=True)
class _Job:
    """What one worker process writes (a contiguous run of shards) and how it opens the source and tokenizer; plain
    values, so it pickles into a spawned process."""

    source: str
    data_dir: str | None
    source_modules: tuple[str, ...]  # modules that register the source's prefix (paper packages)
    tokenizer_dir: str
    tokenizer_kind: str
    token_dtype: str
    out: str
    shards: tuple[_Shard, ...]
    compression: str  # a key of COMPRESSIONS


def prepare(source: str, tokenizer: str, out: str | os.PathLike, *, workers: int = 1,
            docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, data_dir: str | None = None,
            source_modules: Sequence[str] = (), compression: str = "none") -> dict[str, Any]:
    """Tokenise the train and validation splits of the text source `source` with `tokenizer` (see
    `load_source_tokenizer`) into the new dataset directory `out`; returns its manifest.

    Every input is checked before anything is written; `workers` > 1 spawns that many processes; `compression`
    is how the records are stored (COMPRESSIONS; readers handle any)."""
    check_positive(workers=workers, docs_per_shard=docs_per_shard)
    if compression not in COMPRESSIONS:
        raise UserError(f"compression={compression!r} is not one; valid: {', '.join(COMPRESSIONS)}")
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory '{out}' exists and is not an empty directory; valid: a new or empty "
                        "directory (nothing is overwritten)")
    chosen = load_source_tokenizer(tokenizer)
    kind = tokenizer_kind(chosen)
    text_source = get_text_source(source, data_dir=data_dir)
    splits = {name: text_source.split(name) for name in SPLITS}
    plan = _plan_shards({name: len(texts) for name, texts in splits.items()}, docs_per_shard)
    with staged_directory(out) as staging:
        tokenizer_dir = staging / TOKENIZER_DIRNAME
        tokenizer_dir.mkdir()
        for name, data in tokenizer_files(chosen).items():
            (tokenizer_dir / name).write_bytes(data)
        copied = load_tokenizer_copy(tokenizer_dir, kind)  # what the workers and every later run encode with
        dtype = "<u2" if copied.vocab_size <= 1 << 16 else "<i4"
        job = _Job(source, data_dir, tuple(source_modules), os.fspath(tokenizer_dir), kind, dtype, os.fspath(staging),
                   tuple(plan), compression)
        stats = _run_jobs(job, workers, text_source, copied)
        origin = "byte" if tokenizer == "byte" else os.fspath(Path(tokenizer).expanduser().absolute())
        manifest = _manifest(job, copied, origin, docs_per_shard, stats,
                             {name: _split_digest(texts, copied) for name, texts in splits.items()})
        _write_lengths(staging, job.shards, stats)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _write_lengths(staging: Path, shards: Sequence[_Shard], counts: list[dict[str, Any]]) -> None:
    """Each split's documents' token counts (without BOS/EOS) as DIR/<split>-lengths.npy: what the grain pipeline
    plans its rows from without reading the documents (lm_core.data.grain_pipeline)."""
    for name in SPLITS:
        lengths = [n for shard, count in zip(shards, counts, strict=True) if shard.split == name
                   for n in count["lengths"]]
        np.save(staging / lengths_file(name), np.asarray(lengths, np.int64))


def lengths_file(split: str) -> str:
    return f"{split}-lengths.npy"


def _plan_shards(num_documents: dict[str, int], docs_per_shard: int) -> list[_Shard]:
    """Every split's documents cut into shards of docs_per_shard (the last one shorter), split after split."""
    plan = []
    for split, count in num_documents.items():
        num_shards = -(-count // docs_per_shard)
        for index in range(num_shards):
            start, stop = index * docs_per_shard, min(count, (index + 1) * docs_per_shard)
            plan.append(_Shard(split, index, start, stop, f"{split}-{index:05d}-of-{num_shards:05d}.array_record"))
    return plan


def _run_jobs(job: _Job, workers: int, source: TextSource, tokenizer: Any) -> list[dict[str, int]]:
    """Per-shard counts in plan order: written here with one worker, else by `workers` spawned processes, each
    given a contiguous run of shards (spawn, not fork: a forked child would inherit TFDS' and sentencepiece's
    threads in whatever state they were)."""
    groups = [tuple(job.shards[i] for i in group) for group in np.array_split(np.arange(len(job.shards)), workers)
              if len(group)]
    if len(groups) <= 1:
        return _write_shards(job, source, tokenizer)
    with multiprocessing.get_context("spawn").Pool(len(groups)) as pool:
        results = pool.map(_worker, [dataclasses.replace(job, shards=group) for group in groups], chunksize=1)
    return [counts for group in results for counts in group]


def _worker(job: _Job) -> list[dict[str, int]]:
    """A worker process: open the source and the staged tokenizer copy itself, then write its shards."""
    for module in job.source_modules:
        importlib.import_module(module)
    source = get_text_source(job.source, data_dir=job.data_dir)
    return _write_shards(job, source, load_tokenizer_copy(Path(job.tokenizer_dir), job.tokenizer_kind))


def _write_shards(job: _Job, source: TextSource, tokenizer: Any) -> list[dict[str, int]]:
    from array_record.python.array_record_module import ArrayRecordWriter

    counts = []
    for shard in job.shards:
        texts = source.split(shard.split)
        options = f"group_size:1,{COMPRESSIONS[job.compression]}"
        writer = ArrayRecordWriter(os.fspath(Path(job.out) / shard.file), options)
        lengths, chars = [], 0
        try:
            for start in range(shard.start, shard.stop, _ENCODE_CHUNK):
                chunk = [texts[i] for i in range(start, min(start + _ENCODE_CHUNK, shard.stop))]
                for text, ids in zip(chunk, tokenizer.encode_batch(chunk), strict=True):
                    writer.write(encode_record(ids, len(text), job.token_dtype))
                    lengths.append(len(ids))
                    chars += len(text)
        finally:
            writer.close()
        counts.append({"documents": shard.stop - shard.start, "tokens": sum(lengths), "characters": chars,
                       "lengths": lengths})
    return counts


def _split_digest(texts: Sequence[str], tokenizer: Any) -> int:
    """LMDataLoader's content digest of the split (0 for an empty split, which no loader reads)."""
    return content_digest(texts, tokenizer) if len(texts) else 0


def _manifest(job: _Job, tokenizer: Any, origin: str, docs_per_shard: int, counts: list[dict[str, int]],
              digests: dict[str, int]) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for name in SPLITS:
        shards = [(shard, count) for shard, count in zip(job.shards, counts, strict=True) if shard.split == name]
        splits[name] = {
            "documents": sum(count["documents"] for _, count in shards),
            "tokens": sum(count["tokens"] for _, count in shards),  # without the BOS/EOS packing adds
            "characters": sum(count["characters"] for _, count in shards),
            "content_digest": digests[name],
            "lengths": lengths_file(name),  # absent from datasets prepared before it: their lengths are read
            "shards": [{"file": shard.file, "documents": count["documents"]} for shard, count in shards],
        }
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": job.source, "data_dir": job.data_dir or "",
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "kind": job.tokenizer_kind, "origin": origin,
                      "files": sorted(tokenizer_files(tokenizer))},
        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "token_dtype": job.token_dtype, "compression": job.compression, "docs_per_shard": docs_per_shard,
        "splits": splits,
    }
