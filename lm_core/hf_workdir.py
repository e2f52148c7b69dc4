"""Hugging Face checkpoint directories <-> lm_core workdirs (experiments.export_hf / experiments.import_hf).

An export writes what `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load with no custom
code: config.json, model.safetensors (sharded above a size, with its index), generation_config.json and the
tokenizer. An import writes an ordinary workdir: config.json (a training config for train_lm, data.tokenizer=
"pretrained"), the tokenizer under tokenizer/, and checkpoints/0 holding the weights and a fresh optimizer state,
so `sample`, `train_lm` (continued training), `compile_check` and `kv_prediction.train` take it as they take a
trained run. Each parameter is placed on the mesh straight from the memory-mapped safetensors, one device shard
at a time (`jax.make_array_from_callback`), so no host ever holds the whole model.
Both write into a temporary directory renamed at the end: a failure leaves nothing half written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lm_core import hf_convert
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.safetensors_io import CheckpointTensors, TensorSpec, write_checkpoint
from lm_core.staging import staged_directory

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jax.numpy.bfloat16)}
# What an import writes for `train_lm --config=DIR/train_config.py` (an ml_collections config file).
TRAIN_CONFIG_FILE = "train_config.py"
# Checkpoint meta keys of runs that are not one plain Transformer, and why they cannot be exported.
_NOT_PLAIN = {"kvp_variant": "a KV-prediction run holds a frozen base, an auxiliary and a KV predictor, which no "
                             "Hugging Face model has; export the base run (DIR/base) or an aux-only run instead",
              "moma": "MoMa's modality-aware experts (and mixture-of-depths routers) have no Hugging Face "
                      "Llama/Qwen3 equivalent"}


# --- export ---------------------------------------------------------------------------------------------------


def export_workdir(workdir: Path, out: Path, *, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9
                   ) -> list[str]:
    """Write the latest checkpoint of the lm_core run in `workdir` as a HF model directory `out`; returns the
    files written. dtype: "float32" | "bfloat16" (default: the model's param_dtype)."""
    from lm_core.hf_tokenizer import export_hf_tokenizer
    from lm_core.trained_runs import load_trained_model

    refuse_unexportable_workdir(workdir)
    check_new_directory(out, "--out")
    model, tokenizer, _ = load_trained_model(workdir)
    config: ModelConfig = model.config
    hf_convert.refuse_unexportable(config)
    dtype = dtype or config.param_dtype
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    with staged_directory(out) as staging:
        files = write_hf_model(model, staging, dtype=dtype, special_ids=special, max_shard_bytes=max_shard_bytes)
        export_hf_tokenizer(tokenizer, staging, model_max_length=config.max_seq_len)
    return files


def write_hf_model(model: nnx.Module, directory: Path, *, dtype: str, special_ids: dict[str, int | None],
                   max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """The model files of a HF directory (weights, config.json, generation_config.json), no tokenizer; returns
    their names."""
    config: ModelConfig = model.config
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype={dtype!r} is not supported for export; valid: {sorted(EXPORT_DTYPES)}")
    stored = EXPORT_DTYPES[dtype]
    tensors = dict(hf_convert.export_tensors(config, unrolled_params(model)))
    specs = [TensorSpec(name, tuple(array.shape), stored) for name, array in tensors.items()]
    files = write_checkpoint(directory, specs, lambda name: np.asarray(tensors[name]).astype(stored), max_shard_bytes)
    _write_json(directory / "config.json", hf_convert.export_config(config, dtype=dtype, special_ids=special_ids))
    _write_json(directory / "generation_config.json", {**special_ids, "_from_model_config": True})
    return sorted(files + ["config.json", "generation_config.json"])


def refuse_unexportable_workdir(workdir: Path) -> None:
    """UserError for a directory that is not one plain lm_core LM run (a KVP pipeline, MoMa, a KVP run)."""
    from lm_core.checkpoint import has_checkpoints, latest_meta

    if (workdir / "kvp_config.json").is_file():
        raise UserError(f"{workdir} is a KV-prediction pipeline directory (several models); export one of its "
                        f"plain LM runs, e.g. --workdir={workdir / 'base'}")
    if not has_checkpoints(workdir):
        raise UserError(f"{workdir} holds no checkpoints; valid: the workdir of a finished lm_core training run or "
                        "import")
    _, meta = latest_meta(workdir / "checkpoints")
    for key, why in _NOT_PLAIN.items():
        if key in meta:
            raise UserError(f"{workdir} cannot be exported: {why}")


def unrolled_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """{path in the unrolled layout: array} of a Transformer, whether its blocks are stacked or not."""
    params = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] not in ("blocks", "stacked_blocks"):
            params[tuple(path)] = np.asarray(variable.get_value())
    for layer in range(model.config.num_layers):
        for path, variable in nnx.to_flat_state(nnx.state(model.block(layer), nnx.Param)):
            params[("blocks", layer, *path)] = np.asarray(variable.get_value())
    return params


# --- import ---------------------------------------------------------------------------------------------------


def import_checkpoint(hf_dir: Path, workdir: Path, *, max_seq_len: int | None = None, param_dtype: str | None = None,
                      scan_layers: bool = False, seq_len: int = 128) -> ModelConfig:
    """Turn the HF Llama / Mistral / Qwen3 checkpoint in `hf_dir` into an lm_core workdir (module docstring).

    Everything that can refuse the input (config fields, missing tensors or shards, wrong shapes, a tokenizer
    larger than the embedding) is checked before anything is written."""
    from lm_core.hf_tokenizer import PretrainedTokenizer

    check_new_directory(workdir, "--workdir")
    hf_config = read_hf_config(hf_dir)
    tensors = CheckpointTensors(hf_dir)
    param_dtype = param_dtype or _checkpoint_dtype(tensors)
    config = hf_convert.import_config(hf_config, max_seq_len=max_seq_len, param_dtype=param_dtype)
    config = config.replace(scan_layers=scan_layers)
    mappings = hf_convert.tensor_mappings(config, hf_tied=config.tie_embeddings)
    check_tensors(tensors, config, mappings)
    tokenizer = PretrainedTokenizer.load(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} ids but the embedding has "
                        f"{config.vocab_size} rows; valid: a tokenizer whose ids all index the embedding")
    run_config = imported_run_config(config, seq_len=min(seq_len, config.max_seq_len))
    with staged_directory(workdir) as staging:
        tokenizer.save(staging / "tokenizer")
        run_config.data.tokenizer_path = str(workdir.absolute() / "tokenizer")
        _write_checkpoint_zero(staging, run_config, tensors, mappings, tokenizer.vocab_size, hf_dir)
        _write_json(staging / "config.json", run_config.to_dict())
        _write_train_config(staging / TRAIN_CONFIG_FILE, run_config.to_dict(), hf_dir, workdir)
    return config


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is missing or not JSON ({error}); valid: a Hugging Face model directory "
                        "(config.json + safetensors weights + tokenizer files)") from error


def _checkpoint_dtype(tensors: CheckpointTensors) -> str:
    """float32 or bfloat16, as the embedding is stored (float16 weights are widened to float32)."""
    dtype = tensors.spec("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in tensors.names() \
        else np.dtype(np.float32)
    return "bfloat16" if dtype == EXPORT_DTYPES["bfloat16"] else "float32"


def check_tensors(tensors: CheckpointTensors, config: ModelConfig, mappings: list[hf_convert.TensorMapping]) -> None:
    names = set(tensors.names())
    missing = [m.hf_name for m in mappings if m.hf_name not in names]
    if missing:
        raise UserError(f"{tensors.directory} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}; "
                        "valid: a complete checkpoint of the model config.json describes")
    for mapping in mappings:
        expected, found = hf_convert.import_shape(config, mapping), tensors.spec(mapping.hf_name).shape
        if found != expected:
            raise UserError(f"{tensors.directory}: tensor {mapping.hf_name} has shape {list(found)}, config.json "
                            f"implies {list(expected)}; valid: weights matching config.json")


def imported_run_config(config: ModelConfig, *, seq_len: int) -> Any:
    """train_lm's config for continuing to train the imported model: the model as imported, its own tokenizer."""
    from lm_core.run_config import default_config

    run_config = default_config()
    run_config.model.update(config.to_dict())
    run_config.data.tokenizer = "pretrained"
    run_config.data.seq_len = seq_len
    return run_config


def _write_checkpoint_zero(staging: Path, run_config: Any, tensors: CheckpointTensors,
                           mappings: list[hf_convert.TensorMapping], tokenizer_vocab: int, hf_dir: Path) -> None:
    """checkpoints/0: the imported parameters (placed shard by shard over every local device), a fresh optimizer
    state, and an empty data position (the trainer then starts its stream at the beginning)."""
    from lm_core import sharding
    from lm_core.checkpoint import Checkpointer
    from lm_core.model import Transformer
    from lm_core.optim import make_optimizer
    from lm_core.run_config import model_config_from, optimizer_config_from
    from lm_core.train_step import TrainState, train_state_layout

    config = model_config_from(run_config)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
    optimizer = make_optimizer(optimizer_config_from(run_config))
    _, abstract, shardings = train_state_layout(lambda: Transformer(config, rngs=nnx.Rngs(0)), optimizer, mesh)
    readers = {m.path: (m.hf_name, m.layout) for m in mappings}
    params = nnx.map_state(lambda path, v: v.replace(_place(path, v.get_value(), readers, tensors, config)),
                           abstract.params)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(run_config.seed)), sharding.replicated(mesh))
    step = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    meta = {"model": config.to_dict(), "tokenizer_vocab_size": tokenizer_vocab, "imported_from": str(hf_dir)}
    checkpointer = Checkpointer(staging / "checkpoints", keep=run_config.keep_checkpoints)
    checkpointer.save(0, TrainState(step, params, opt_state, rng), {}, meta, wait=True)
    checkpointer.close()


def _write_train_config(path: Path, values: dict[str, Any], hf_dir: Path, workdir: Path) -> None:
    """A config file for `train_lm --config=<path>`: the imported model's run config, so --config.<field>
    overrides work as with any config file (config.json itself is rewritten by every run)."""
    header = (f'"""train_lm config of the model imported from {hf_dir} by experiments.import_hf. Fine-tune with\n'
              f"    python -m experiments.train_lm --config={workdir}/{TRAIN_CONFIG_FILE} --workdir={workdir} "
              '--config.steps=N --config.data.source=...\n"""\n')
    body = ("\nimport json\n\nimport ml_collections\n\n\ndef get_config() -> ml_collections.ConfigDict:\n"
            "    return ml_collections.ConfigDict(json.loads(CONFIG))\n\n\n")
    path.write_text(header + body + "CONFIG = r'''" + json.dumps(values, indent=2, sort_keys=True, default=str)
                    + "'''\n")


def _place(path: tuple, abstract: jax.ShapeDtypeStruct, readers: dict[tuple, tuple[str, str]],
           tensors: CheckpointTensors, config: ModelConfig) -> jax.Array:
    """Our parameter `path` as a global array in `abstract`'s sharding, each device's block read on its own."""
    read = _block_reader(tuple(path), abstract.shape, readers, tensors, config)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                        lambda index: np.asarray(read(index), dtype=abstract.dtype))


def _block_reader(path: tuple, shape: tuple[int, ...], readers: dict[tuple, tuple[str, str]],
                  tensors: CheckpointTensors, config: ModelConfig) -> Callable[[tuple], np.ndarray]:
    """index -> that block of our parameter, read from the (memory-mapped) HF tensors. Stacked blocks
    (scan_layers) take their layer axis from the per-layer HF tensors."""
    if path[0] == "stacked_blocks":
        leaf = path[2:]

        def read_stacked(index: tuple) -> np.ndarray:
            layers = range(config.num_layers)[index[0]]
            return np.stack([_view(("blocks", layer, *leaf), shape[1:], readers, tensors)[index[1:]]
                             for layer in layers])
        return read_stacked
    view = _view(path, shape, readers, tensors)
    return lambda index: view[index]


def _view(path: tuple, shape: tuple[int, ...], readers: dict[tuple, tuple[str, str]],
          tensors: CheckpointTensors) -> np.ndarray:
    name, layout = readers[path]
    return hf_convert.to_ours(tensors.tensor(name), layout, shape)


# --- shared -----------------------------------------------------------------------------------------------------


def check_new_directory(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{flag}={path} exists and is not an empty directory; valid: a new path (nothing is "
                        "overwritten)")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
