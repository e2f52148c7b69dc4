"""lm_core.atomic_files: a failed write keeps the old file and leaves no temporary; the formats round-trip."""

import json

import numpy as np
import pytest

from lm_core import atomic_files


def test_each_format_round_trips(tmp_path):
    assert atomic_files.write_json_atomically(tmp_path / "a" / "x.json", {"b": 1, "a": tmp_path}, sort_keys=True
                                              ).read_text() == json.dumps({"a": str(tmp_path), "b": 1}, indent=2) + "\n"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2}]
    path = atomic_files.write_jsonl_atomically(tmp_path / "m.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(np.load(atomic_files.save_npy_atomically(tmp_path / "t.npy", values)), values)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "m.jsonl", "t.npy", "x.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_files.write_text_atomically(tmp_path / "r.txt", "old\n")

    def broken_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_files.write_text_atomically(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]
