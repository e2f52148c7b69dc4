"""Directories written whole or not at all (lm_core.staging) and module state files (lm_core.state_files)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.errors import UserError
from lm_core.staging import replaced_directory, staged_directory
from lm_core.state_files import load_state_npz, save_state_npz


def test_a_replaced_directory_is_the_old_one_or_the_whole_new_one(tmp_path):
    target = tmp_path / "out"
    with replaced_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(KeyboardInterrupt), replaced_directory(target) as staging:  # interrupted half way
        (staging / "a.txt").write_text("second")
        raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with replaced_directory(target) as staging:
        (staging / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, nothing of the old one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with replaced_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    rename = Path.rename

    def failing_rename(self, destination):
        if self.name.startswith(".out.partial"):
            raise OSError("disk full")
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"), replaced_directory(target) as staging:
        (staging / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_staged_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "data"
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "shard").write_text("half")
        raise RuntimeError("writer failed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with staged_directory(target) as staging:
        (staging / "shard").write_text("whole")
    assert (target / "shard").read_text() == "whole"


class Tiny(nnx.Module):
    def __init__(self, width: int):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=nnx.Rngs(i)) for i in range(2)])


def test_module_state_round_trips_and_a_mismatch_is_refused(tmp_path):
    model = Tiny(4)
    save_state_npz(model, tmp_path / "state.npz")
    loaded = load_state_npz(tmp_path / "state.npz", nnx.eval_shape(lambda: Tiny(4)), label="test state",
                            written_by="save_state_npz")
    np.testing.assert_array_equal(loaded.layers[1].kernel[...], model.layers[1].kernel[...])
    assert isinstance(loaded.layers[0].bias[...], jnp.ndarray)
    with pytest.raises(UserError, match=r"test state '.*state.npz' does not match its config \(4 arrays differ"):
        load_state_npz(tmp_path / "state.npz", nnx.eval_shape(lambda: Tiny(5)), label="test state",
                       written_by="save_state_npz")
    (tmp_path / "state.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="state.npz' is missing or corrupt"):
        load_state_npz(tmp_path / "state.npz", nnx.eval_shape(lambda: Tiny(4)), label="test state",
                       written_by="save_state_npz")
