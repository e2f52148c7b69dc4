"""Safetensors checkpoints as Hugging Face writes them: read lazily, written shard by shard.

The format: an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}` padded with spaces, then the tensors' raw little-endian bytes. A checkpoint
is one `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`.

Reading memory-maps each file, so taking a tensor (or a slice of one) reads only those bytes: an import can place
each device's shard of a parameter without ever holding the whole model (experiments.import_hf). Written here
rather than through the `safetensors` package because its numpy API has no bfloat16.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from lm_core.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SafetensorsFile:
    """One .safetensors file; `tensor(name)` is a read-only memory-mapped view (nothing is read until used)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            self._data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len)
        except (OSError, ValueError, struct.error) as error:
            raise UserError(f"{path} is not a readable safetensors file ({error}); valid: a file written by "
                            "transformers' save_pretrained or safetensors") from error
        header.pop("__metadata__", None)
        self._entries = header

    def names(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        entry = self._entries[name]
        if entry["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {name} has dtype {entry['dtype']}; valid: {sorted(DTYPES)}")
        return TensorSpec(name, tuple(entry["shape"]), DTYPES[entry["dtype"]])

    def tensor(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        if end - begin != spec.nbytes or end > self._data.size:
            raise UserError(f"{self.path}: tensor {name} is truncated or its header is corrupt; valid: a complete "
                            "safetensors file (download or copy it again)")
        return self._data[begin:end].view(spec.dtype).reshape(spec.shape)


class CheckpointTensors:
    """Every tensor of a (possibly sharded) checkpoint directory by name, each from the shard that holds it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, SafetensorsFile] = {}
        self._where = _tensor_locations(directory)
        missing = sorted({f for f in self._where.values() if not (directory / f).is_file()})
        if missing:
            raise UserError(f"{directory} lacks the shard(s) {missing} that {INDEX_FILE} lists; valid: a complete "
                            "checkpoint directory (every shard of the index present)")

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        shard = self._where[name]
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.directory / shard)
        return self._files[shard]

    def spec(self, name: str) -> TensorSpec:
        return self._file(name).spec(name)

    def tensor(self, name: str) -> np.ndarray:
        return self._file(name).tensor(name)


def _tensor_locations(directory: Path) -> dict[str, str]:
    """{tensor name: the file in `directory` holding it}, from the index when there is one."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{index} is not a readable safetensors index ({error}); valid: a JSON file with a "
                            "weight_map {tensor: shard file}") from error
        return {str(name): str(shard) for name, shard in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        file = SafetensorsFile(directory / SINGLE_FILE)
        return dict.fromkeys(file.names(), SINGLE_FILE)
    raise UserError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}; valid: a Hugging Face checkpoint "
                    "directory in safetensors format")


def write_checkpoint(directory: Path, specs: Sequence[TensorSpec], fetch: Callable[[str], np.ndarray],
                     max_shard_bytes: int) -> list[str]:
    """Write the tensors `specs` names (each produced by `fetch(name)` when its shard is written, so only one
    shard is in memory at a time) as one file, or as shards of at most `max_shard_bytes` plus the index.
    Returns the file names written."""
    shards = _group_into_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        _write_file(directory / name, shard, fetch)
    if len(shards) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_FILE)
    return names


def _group_into_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors packed greedily; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_file(path: Path, specs: Sequence[TensorSpec], fetch: Callable[[str], np.ndarray]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for spec in specs:
            array = np.ascontiguousarray(fetch(spec.name), dtype=spec.dtype)
            if array.shape != spec.shape:
                raise ValueError(f"tensor {spec.name} has shape {array.shape}, its spec says {spec.shape}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
