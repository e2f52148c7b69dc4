"""Save / load of a VQ tokenizer: a directory of config.json + state.npz ("/"-joined paths of nnx.state -> arrays).

`save_vq` replaces the directory atomically; `load_vq` rebuilds the model from its config and refuses (UserError
naming the file) a missing, corrupt or mismatched state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from flax import nnx

from lm_core.errors import UserError
from lm_core.staging import replaced_directory
from lm_core.state_files import load_state_npz, save_state_npz
from moma.vq.model import VQConfig, VQTokenizer

CONFIG_FILE = "config.json"
STATE_FILE = "state.npz"


def save_vq(model: VQTokenizer, directory: str | os.PathLike) -> Path:
    """Write the tokenizer to `directory` atomically: a complete new directory replaces any old one."""
    directory = Path(directory)
    with replaced_directory(directory) as staging:
        save_state_npz(model, staging / STATE_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
    return directory


def load_config(directory: str | os.PathLike) -> VQConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return VQConfig(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"VQ tokenizer config '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); "
                        "valid: a directory written by moma.vq.save_vq") from e


def load_vq(directory: str | os.PathLike) -> VQTokenizer:
    """The tokenizer `save_vq` wrote; a missing, corrupt or mismatched state is a UserError naming the file."""
    config = load_config(directory)
    abstract = nnx.eval_shape(lambda: VQTokenizer(config, rngs=nnx.Rngs(0)))
    return load_state_npz(Path(directory) / STATE_FILE, abstract, label="VQ tokenizer state",
                          written_by="moma.vq.save_vq")
