"""Pretrained tokenizers in, every tokenizer of ours out to Hugging Face.

In: `PretrainedTokenizer` reads a Hugging Face `tokenizer.json` (through the `tokenizers` library) or any
sentencepiece `tokenizer.model` (Llama-2 / T5 / Gemma ids) together with its special tokens, and satisfies
`lm_core.tokenizer.TextTokenizer`, so the data pipeline and the trainer use it like our own tokenizers
(`config.data.tokenizer="pretrained"`, `config.data.tokenizer_path=...`).

Out: `export_hf_tokenizer` writes a directory that `transformers.AutoTokenizer.from_pretrained` loads without custom
code or network, and whose `encode(text, add_special_tokens=False)` is exactly our `encode(text)`: a `tokenizer.json`
(built here with the `tokenizers` library for sentencepiece and byte tokenizers), `tokenizer_config.json`,
`special_tokens_map.json`, plus `tokenizer.model` for sentencepiece ones.

`tokenizers` is imported only where a tokenizer.json is read or written, so `lm_core.hf_tokenizer` itself stays as
light as `lm_core.tokenizer`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from lm_core import tokenizer as tok
from lm_core.atomic_files import write_bytes_atomically
from lm_core.errors import UserError, brief
from lm_core.staging import replaced_directory

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = tok.MODEL_FILENAME  # "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# The only files a PretrainedTokenizer reads and `save` copies (model weights and configs never travel with it).
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)
PRETRAINED_DIRNAME = "tokenizer"  # a workdir's copy of a PretrainedTokenizer: workdir/tokenizer/
_VALID_PATH = ("valid: a directory holding tokenizer.json and/or tokenizer.model (plus optional tokenizer_config.json, "
               "special_tokens_map.json, generation_config.json), or one tokenizer.json / sentencepiece model file")
_Piece = model_pb2.ModelProto.SentencePiece
_SPM_BPE, _SPM_UNIGRAM = model_pb2.TrainerSpec.BPE, model_pb2.TrainerSpec.UNIGRAM
_SPACE = "\u2581"  # sentencepiece's visible space


class _Backend(Protocol):
    """The tokenization proper of a PretrainedTokenizer: a tokenizer.json or a sentencepiece model."""

    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def default_ids(self) -> dict[str, int]: ...


class _JsonBackend:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library exactly as transformers runs it."""

    def __init__(self, data: bytes, *, split_special_tokens: bool):
        tokenizers = _import_tokenizers()
        self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        # Some hub files carry a truncation or padding setting; we encode whole documents.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # transformers' `split_special_tokens`: special tokens written in the text are encoded as text.
        self._tokenizer.encode_special_tokens = split_special_tokens
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def default_ids(self) -> dict[str, int]:
        return {}  # a tokenizer.json names no roles; the configs do


class _SentencePieceBackend:
    """A sentencepiece model with whatever special ids it was trained with (-1 = none)."""

    def __init__(self, proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=min(8, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        # Control, unknown and unused pieces are special tokens in Hugging Face terms: skipped, as there.
        sp = self._sp
        return sp.decode([i for i in ids if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))])

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def default_ids(self) -> dict[str, int]:
        sp = self._sp
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        return {role: token_id for role, token_id in ids.items() if token_id >= 0}


class PretrainedTokenizer:
    """A pretrained tokenizer with its own special ids, as a `TextTokenizer`.

    Backed by `tokenizer.json` when the files hold one, else by the sentencepiece `tokenizer.model`.
    Special tokens: `bos_token` / `eos_token` / `pad_token` / `unk_token` of tokenizer_config.json, else of
    special_tokens_map.json (strings or {"content": ...} dicts); the EOS may also come from generation_config.json's
    `eos_token_id` (the first, when a list); else the sentencepiece model's own ids. Then:
      - no BOS (Qwen): bos_id = eos_id, the document separator such models are trained with (our packing puts
        bos_id before and eos_id after every document);
      - no pad token: pad_id = eos_id (padding is masked by segment ids, its id never reaches the loss);
      - no EOS at all: refused, since packed documents could not be told apart.
    vocab_size is the whole id range, added tokens included (max id + 1); nothing is reserved. `encode` adds no
    special tokens; special tokens written in the text are matched as the tokenizer.json does, unless
    tokenizer_config.json sets `split_special_tokens` (sentencepiece never matches them). `decode` skips special
    tokens and pad.
    """

    def __init__(self, files: dict[str, bytes], source: str | Path = "<memory>"):
        self._files = dict(files)
        self.source = Path(source)
        self._configs = {name: _read_json_config(files, name, self.source) for name in
                         (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)}
        self._backend = self._make_backend()
        self.vocab_size = self._backend.vocab_size
        ids = _special_ids(self._backend, self._configs, self.source)
        self.eos_id = ids["eos"]
        self.bos_id = ids.get("bos", self.eos_id)
        self.pad_id = ids.get("pad", self.eos_id)
        self.unk_id = ids.get("unk", -1)

    def _make_backend(self) -> _Backend:
        split = bool(self._configs[TOKENIZER_CONFIG].get("split_special_tokens", False))
        name = TOKENIZER_JSON if TOKENIZER_JSON in self._files else SENTENCEPIECE_MODEL
        try:
            if name == TOKENIZER_JSON:
                return _JsonBackend(self._files[name], split_special_tokens=split)
            return _SentencePieceBackend(self._files[name])
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exception, sentencepiece RuntimeError
            raise UserError(f"'{self.source}' has a {name} that does not load ({brief(e)}); "
                            f"{_VALID_PATH}") from e

    @property
    def reserved_range(self) -> range:
        return range(self.vocab_size, self.vocab_size)

    @property
    def backend_kind(self) -> str:
        """"tokenizer.json" or "sentencepiece": what encodes."""
        return "tokenizer.json" if isinstance(self._backend, _JsonBackend) else "sentencepiece"

    @property
    def files(self) -> dict[str, bytes]:
        """The tokenizer files as loaded (name -> bytes): what `save` writes."""
        return dict(self._files)

    def config(self, name: str) -> dict[str, Any]:
        """The parsed tokenizer_config.json / special_tokens_map.json / generation_config.json ({} if absent)."""
        return dict(self._configs[name])

    def encode(self, text: str) -> list[int]:
        return self._backend.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return self._backend.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in skip])

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`, or unk_id (-1 when there is no unknown token) when the vocabulary has no such piece."""
        token_id = self._backend.token_to_id(piece)
        return self.unk_id if token_id is None else token_id

    def id_to_piece(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer files into `directory`, atomically: a reader sees no directory or a complete one."""
        _write_directory_atomically(Path(directory), self._files)

    @classmethod
    def load(cls, path: str | Path) -> PretrainedTokenizer:
        """From a directory (tokenizer.json preferred over tokenizer.model when both are there) or one file."""
        path = Path(path)
        if path.is_dir():
            names = [name for name in TOKENIZER_FILES if (path / name).is_file()]
            if TOKENIZER_JSON not in names and SENTENCEPIECE_MODEL not in names:
                raise UserError(f"tokenizer directory '{path}' holds neither {TOKENIZER_JSON} nor "
                                f"{SENTENCEPIECE_MODEL}; {_VALID_PATH}")
            return cls({name: _read_bytes(path / name) for name in names}, path)
        if path.name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG):
            raise UserError(f"'{path}' is a config, not a tokenizer; valid: the directory holding it and the "
                            f"{TOKENIZER_JSON} / {SENTENCEPIECE_MODEL}")
        if path.is_file():  # one file: a tokenizer.json by its .json name, else a sentencepiece model
            return cls({TOKENIZER_JSON if path.suffix == ".json" else SENTENCEPIECE_MODEL: _read_bytes(path)}, path)
        raise UserError(f"tokenizer path '{path}' does not exist; {_VALID_PATH}")

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer('{self.source}', {self.backend_kind}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


def load_any_tokenizer(path: str | Path) -> tok.Tokenizer | tok.ByteTokenizer | PretrainedTokenizer:
    """The tokenizer a workdir (or a tokenizer path inside one) holds.

    A directory with `tokenizer/` (PretrainedTokenizer.save) or itself holding tokenizer.json / tokenizer_config.json
    is pretrained; one with `tokenizer.model`, or a file, is ours (Tokenizer.save / ByteTokenizer.save)."""
    path = Path(path)
    if path.is_file():
        return tok.load_tokenizer(path)
    if (path / PRETRAINED_DIRNAME).is_dir():
        return PretrainedTokenizer.load(path / PRETRAINED_DIRNAME)
    if (path / TOKENIZER_JSON).is_file() or (path / TOKENIZER_CONFIG).is_file():
        return PretrainedTokenizer.load(path)
    if (path / SENTENCEPIECE_MODEL).is_file():
        return tok.load_tokenizer(path / SENTENCEPIECE_MODEL)
    raise UserError(f"'{path}' holds no tokenizer; valid: a workdir with {SENTENCEPIECE_MODEL} or "
                    f"{PRETRAINED_DIRNAME}/, a tokenizer directory, or a {SENTENCEPIECE_MODEL} file")


def workdir_tokenizer_files(workdir: str | Path) -> dict[str, bytes]:
    """{relative path: bytes} of the tokenizer files a workdir holds (tokenizer.model, tokenizer/*): equal for two
    runs exactly when they read the same token ids; {} for a workdir without any (an old byte-tokenizer run)."""
    workdir = Path(workdir)
    files = {}
    if (workdir / SENTENCEPIECE_MODEL).is_file():
        files[SENTENCEPIECE_MODEL] = _read_bytes(workdir / SENTENCEPIECE_MODEL)
    for name in TOKENIZER_FILES:
        if (workdir / PRETRAINED_DIRNAME / name).is_file():
            files[f"{PRETRAINED_DIRNAME}/{name}"] = _read_bytes(workdir / PRETRAINED_DIRNAME / name)
    return files


# --- special tokens ---------------------------------------------------------------------------------------------


def _special_ids(backend: _Backend, configs: dict[str, dict[str, Any]], source: Path) -> dict[str, int]:
    """{"bos", "eos", "pad", "unk"} -> id of each role the configs (or the sentencepiece model) name; the caller
    fills in the missing ones (class docstring)."""
    ids = dict(backend.default_ids())
    for role in ("bos", "eos", "pad", "unk"):
        named = _named_token(configs, f"{role}_token")
        if named is not None:
            token, file = named
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise UserError(f"{role}_token {token!r} of '{source / file}' is not in the tokenizer's vocabulary; "
                                "valid: a token of its tokenizer.json / tokenizer.model")
            ids[role] = token_id
        elif role == "eos" and (generation_eos := _generation_eos_id(configs[GENERATION_CONFIG])) is not None:
            ids[role] = generation_eos
    if "eos" not in ids:
        raise UserError(f"tokenizer '{source}' has no EOS token (none in tokenizer_config.json, "
                        "special_tokens_map.json, generation_config.json or the sentencepiece model); valid: a "
                        "tokenizer with an eos_token, which separates packed documents")
    for role, token_id in ids.items():
        if not 0 <= token_id < backend.vocab_size:
            raise UserError(f"tokenizer '{source}' has {role} id {token_id}; valid: 0 <= id < {backend.vocab_size}")
    return ids


def _named_token(configs: dict[str, dict[str, Any]], key: str) -> tuple[str, str] | None:
    """(token, file) of `key` (e.g. "eos_token") in tokenizer_config.json, else special_tokens_map.json."""
    for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        value = configs[file].get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value, file
    return None


def _generation_eos_id(config: dict[str, Any]) -> int | None:
    value = config.get("eos_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_json_config(files: dict[str, bytes], name: str, source: Path) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"'{source}' has a {name} that is not JSON ({brief(e)}); valid: the JSON object "
                        "Hugging Face writes") from e
    if not isinstance(value, dict):
        raise UserError(f"'{source}' has a {name} that is not a JSON object; valid: the object Hugging Face writes")
    return value


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"tokenizer file '{path}' is not readable ({brief(e)}); {_VALID_PATH}") from e


def _write_directory_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a directory that replaces `directory` whole (a reader never sees a half-written
    tokenizer)."""
    with replaced_directory(directory) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


# --- export to Hugging Face -------------------------------------------------------------------------------------


def export_hf_tokenizer(tokenizer: Any, out_dir: Path, *, model_max_length: int) -> None:
    """Write `tokenizer` into `out_dir` (which exists) for `transformers.AutoTokenizer.from_pretrained(out_dir)`.

    Exact: hf.encode(text, add_special_tokens=False) == tokenizer.encode(text), the bos / eos / pad ids are ours,
    and hf.decode(ids) == tokenizer.decode(ids). For our own tokenizers, hf(text) (add_special_tokens=True) puts
    BOS first, as training saw every document; special tokens written in the text encode as text (as in
    sentencepiece). A PretrainedTokenizer's tokenizer files are copied, its tokenizer_config.json updated (a
    generation_config.json is the model export's to write, so none is written here).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"export directory '{out_dir}' does not exist; valid: an existing directory")
    if isinstance(tokenizer, PretrainedTokenizer):
        files, config = _pretrained_export(tokenizer)
    elif isinstance(tokenizer, tok.Tokenizer):
        files, config = _sentencepiece_export(tokenizer.model_proto, tokenizer), _our_config(tokenizer)
    elif isinstance(tokenizer, tok.ByteTokenizer):
        files, config = {TOKENIZER_JSON: _byte_tokenizer_json(tokenizer)}, _our_config(tokenizer)
    else:
        raise UserError(f"cannot export a {type(tokenizer).__name__} to Hugging Face; valid: Tokenizer, "
                        "ByteTokenizer or PretrainedTokenizer")
    config.update(model_max_length=int(model_max_length), clean_up_tokenization_spaces=False)
    files[TOKENIZER_CONFIG] = _json_bytes(config)
    # A pretrained map keeps its other entries (additional_special_tokens, ...); the four roles are ours.
    special_map = tokenizer.config(SPECIAL_TOKENS_MAP) if isinstance(tokenizer, PretrainedTokenizer) else {}
    special_map.update({key: config[key] for key in _ROLE_KEYS if config.get(key)})
    files[SPECIAL_TOKENS_MAP] = _json_bytes(special_map)
    for name, data in files.items():
        write_bytes_atomically(out_dir / name, data)


_ROLE_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _role_tokens(tokenizer: Any, id_to_token: Any) -> dict[str, str | None]:
    unk_id = getattr(tokenizer, "unk_id", -1)
    return {"bos_token": id_to_token(tokenizer.bos_id), "eos_token": id_to_token(tokenizer.eos_id),
            "pad_token": id_to_token(tokenizer.pad_id), "unk_token": id_to_token(unk_id) if unk_id >= 0 else None}


def _our_config(tokenizer: tok.Tokenizer | tok.ByteTokenizer) -> dict[str, Any]:
    """tokenizer_config.json of our own tokenizers: ids 0..3 are <pad> <unk> <s> </s> in both."""
    names = {tok.PAD_ID: "<pad>", tok.UNK_ID: "<unk>", tok.BOS_ID: "<s>", tok.EOS_ID: "</s>"}
    return {"tokenizer_class": "PreTrainedTokenizerFast", **_role_tokens(tokenizer, names.get),
            "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True}


def _pretrained_export(tokenizer: PretrainedTokenizer) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Its files (tokenizer.json built from the sentencepiece model when it has none), and its tokenizer_config
    with our resolved special tokens and the generic fast class, so transformers runs that tokenizer.json as is."""
    # generation_config.json belongs to the model export (AutoTokenizer never reads it): not written here.
    files = {name: data for name, data in tokenizer.files.items() if name not in (TOKENIZER_CONFIG, GENERATION_CONFIG)}
    config = tokenizer.config(TOKENIZER_CONFIG)
    config.pop("auto_map", None)  # custom code is not needed to run a tokenizer.json
    if TOKENIZER_JSON in files:
        files[TOKENIZER_JSON] = _without_truncation(files[TOKENIZER_JSON])
    else:
        files.update(_sentencepiece_export(files[SENTENCEPIECE_MODEL], tokenizer))
        config["split_special_tokens"] = True  # sentencepiece never reads special tokens from text
    config.update(tokenizer_class="PreTrainedTokenizerFast", **_role_tokens(tokenizer, tokenizer.id_to_piece))
    return files, config


def _without_truncation(data: bytes) -> bytes:
    """The tokenizer.json without a truncation or padding setting, which our encode does not apply either."""
    value = json.loads(data)
    if value.get("truncation") is None and value.get("padding") is None:
        return data
    return _json_bytes({**value, "truncation": None, "padding": None})


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise UserError("reading or writing a tokenizer.json needs the `tokenizers` package; valid: pip install "
                        "tokenizers (or use a sentencepiece tokenizer.model)") from e
    return tokenizers


# --- sentencepiece -> tokenizer.json ----------------------------------------------------------------------------


def _sentencepiece_export(proto: bytes, tokenizer: Any) -> dict[str, bytes]:
    """tokenizer.json (+ the model itself) of a sentencepiece model; BOS-first post-processing for ours."""
    tokenizers = _import_tokenizers()
    converted = sentencepiece_to_tokenizers(proto)
    if isinstance(tokenizer, tok.Tokenizer):
        bos = converted.id_to_token(tokenizer.bos_id)
        converted.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    return {TOKENIZER_JSON: converted.to_str(pretty=True).encode("utf-8"), SENTENCEPIECE_MODEL: proto}


def sentencepiece_to_tokenizers(proto: bytes) -> Any:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like the sentencepiece model `proto` (BPE or
    unigram; ids kept). It follows the model's own normalizer spec: its precompiled character map (nfkc, ...),
    extra-whitespace removal, whitespace escaping and dummy prefix, byte fallback. BPE merges are every split of a
    normal piece into two normal pieces, ranked by the merged piece's score, which is how sentencepiece picks its
    next merge. Control, unknown and unused pieces (our reserved ids) become special tokens; user-defined pieces
    are cut out of the text whole, as sentencepiece emits them. One difference is left for unigram models: the
    tokenizers lattice holds every piece, so a control token's text written in the text ("</s>") encodes as that
    token, where sentencepiece spells it out (BPE merges never build it, so BPE models are exact there too)."""
    tokenizers = _import_tokenizers()
    model = _parse_proto(proto)
    trainer, spec = model.trainer_spec, model.normalizer_spec
    if trainer.model_type not in (_SPM_BPE, _SPM_UNIGRAM) or trainer.treat_whitespace_as_suffix:
        raise UserError(f"cannot convert a sentencepiece {model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} "
                        "model (treat_whitespace_as_suffix="
                        f"{trainer.treat_whitespace_as_suffix}) to tokenizer.json; valid: BPE or UNIGRAM models "
                        "with whitespace as prefix")
    pieces = list(model.pieces)
    user_defined = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    unk = pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == _SPM_BPE:
        converted = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_bpe_merges(pieces), unk_token=unk,
            fuse_unk=True, byte_fallback=trainer.byte_fallback, ignore_merges=bool(user_defined)))
    else:
        converted = tokenizers.Tokenizer(tokenizers.models.Unigram(
            [(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback))
    steps = _sentencepiece_normalizers(tokenizers, spec)
    converted.normalizer = tokenizers.normalizers.Sequence(steps) if steps else None
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        converted.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
    converted.decoder = tokenizers.decoders.Sequence(_sentencepiece_decoders(tokenizers, spec, trainer.byte_fallback))
    specials = (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.UNUSED)
    converted.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                                  for p in pieces if p.type in specials])
    return converted


def _parse_proto(proto: bytes) -> model_pb2.ModelProto:
    try:
        return model_pb2.ModelProto.FromString(proto)
    except Exception as e:  # protobuf's DecodeError
        raise UserError(f"not a sentencepiece model ({brief(e)}); valid: a tokenizer.model") from e


def _bpe_merges(pieces: list[Any]) -> list[tuple[str, str]]:
    """(left, right) merges, best first: sentencepiece merges the adjacent pair whose concatenation is the
    highest-scoring normal piece, so every split of such a piece into two normal pieces is one merge of its rank."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _Piece.NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    return [(left, right) for _, _, left, right in ranked]


def _sentencepiece_normalizers(tokenizers: Any, spec: Any) -> list[Any]:
    """Sentencepiece's normalization, in its order: character map, extra spaces, dummy prefix, visible spaces."""
    normalizers = tokenizers.normalizers
    steps = []
    if spec.precompiled_charsmap:
        # `tokenizers`' Precompiled maps a whole grapheme by the shortest key that starts it, and maps long graphemes
        # char by char: alone it drops the second mark of "e\u0302\u0301" and leaves NFD Hangul apart. Composing
        # with NFKC first leaves it the single characters, where it is exact. Over every key of sentencepiece's nfkc
        # table this differs only on canonically equivalent spellings (marks out of canonical order, partly composed
        # sequences the table leaves as they are) and characters newer than tokenizers' Unicode tables.
        if "nfkc" in spec.name:
            steps.append(normalizers.NFKC())
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only " " counts: sentencepiece keeps newlines and tabs
        steps += [normalizers.Replace(tokenizers.Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # to non-empty text only, like sentencepiece
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    return steps


def _sentencepiece_decoders(tokenizers: Any, spec: Any, byte_fallback: bool) -> list[Any]:
    decoders = tokenizers.decoders
    steps = [decoders.Replace(_SPACE, " ")] if spec.escape_whitespaces else []
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())  # Strip works per token: strip the dummy prefix of the whole text only
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return steps


# --- ByteTokenizer -> tokenizer.json ----------------------------------------------------------------------------


def _byte_tokenizer_json(tokenizer: tok.ByteTokenizer) -> bytes:
    """Ids = byte + 4: a BPE without merges over byte-level characters (each byte one visible character, one
    token), specials 0..3, reserved ids as special `<reserved_i>` tokens at the end."""
    tokenizers = _import_tokenizers()
    byte_chars = _bytes_to_unicode()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    reserved = [f"<reserved_{i}>" for i in range(tokenizer.num_reserved_ids)]
    vocab = {name: i for i, name in enumerate(specials)}
    vocab.update({byte_chars[b]: tok.NUM_SPECIAL_IDS + b for b in range(tok.NUM_BYTE_PIECES)})
    vocab.update({name: tokenizer.reserved_range.start + i for i, name in enumerate(reserved)})
    converted = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    converted.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    converted.decoder = tokenizers.decoders.ByteLevel()
    converted.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A:0", pair="<s> $A:0 <s> $B:1", special_tokens=[("<s>", tok.BOS_ID)])
    converted.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                                  for name in specials + reserved])
    return converted.to_str(pretty=True).encode("utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> visible character map, which `tokenizers`' ByteLevel pre-tokenizer and decoder use."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
