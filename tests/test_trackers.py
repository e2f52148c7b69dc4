"""Trackers and profiling in real runs: an offline W&B run that holds metrics.jsonl's rows and continues on resume,
a jax.profiler window, and one-line refusals of bad values.

The W&B runs are real `wandb` offline runs (no network, no login: WANDB_API_KEY is unset and WANDB_BASE_URL points
at a closed local port). They are read back from the `.wandb` file wandb writes (see `wandb_records`).
"""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from lm_core.errors import UserError
from lm_core.metrics import read_metrics
from tests import helpers


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent, no console capture, no system-stats sampler, and nothing written outside tmp_path."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off",
                            WANDB_BASE_URL="http://127.0.0.1:9", WANDB__DISABLE_STATS="true",
                            WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
                            WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
                            WANDB_DATA_DIR=str(tmp_path / "wandb_data")).items():
        monkeypatch.setenv(name, value)


def tiny_run(tmp_path: Path, **changes: Any):
    """tests.helpers.tiny_run, evaluating every 2 of 4 steps on one batch and saving every 2."""
    return helpers.tiny_run(tmp_path, **{**dict(steps=4, eval_every=2, eval_batches=1, checkpoint_every=2),
                                         **changes})


def sigterm_at(step: int):
    """A TrainTask.make_data whose loader sends this process SIGTERM while fetching the batch of `step` (counted
    in this process), as a scheduler would: the trainer finishes that step, saves and stops."""
    from lm_core.run_data import TrainData, text_train_data

    class Signalling:
        def __init__(self, loader: Any):
            self.loader, self.count = loader, 0

        def next(self) -> Any:
            self.count += 1
            if self.count == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.loader.next()

        def state(self) -> Any:
            return self.loader.state()

        def restore(self, saved: Any) -> None:
            self.loader.restore(saved)

    def make_data(config, workdir, model_config) -> TrainData:
        data = text_train_data(config, workdir, model_config)
        return TrainData(data.tokenizer, Signalling(data.loader), data.eval_batches)

    return make_data


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records (`wandb.proto.wandb_internal_pb2.Record`) of a run's `.wandb` file.

    wandb 0.31 ships no Python reader of this file (the old `wandb.sdk.internal.datastore` is gone; wandb-core, in
    Go, reads and writes it), and its `files/` folder holds no summary or history in offline mode. The format is
    small and long stable: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log records in 32 KiB
    blocks, each chunk a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes. A
    change of format fails here loudly (header check or protobuf parse), never as a silent pass."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path}: not a W&B log"
    block, position, pending, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(folder: Path) -> dict[str, Any]:
    """What one offline attempt logged: its run id, name, project, config, history rows by step and exit code."""
    (log_file,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"history": {}, "exit_code": None}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project,
                       config={item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            # wandb-core stores some keys (`_step` among them) as a one-element nested_key instead of key
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history"][row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def test_an_offline_wandb_run_holds_the_metrics_rows_finishes_on_sigterm_and_a_resume_continues_it(
        tmp_path, wandb_env):
    from lm_core.task import TrainTask
    from lm_core.trainer import train

    workdir = tmp_path / "run"
    config = tiny_run(tmp_path)
    config.log.wandb = True
    config.log.wandb_project = "trackers-test"
    assert train(config, workdir, TrainTask(make_data=sigterm_at(3))).stopped_by_signal  # steps 1-3, then stops
    run_id = (workdir / "wandb_run_id").read_text().strip()
    (first,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    assert train(config, workdir).step == 4  # resumes at 3
    second = [folder for folder in (workdir / "wandb").glob(f"offline-run-*-{run_id}") if folder != first]
    assert len(second) == 1 and (workdir / "wandb_run_id").read_text().strip() == run_id
    attempts = [offline_run(first), offline_run(second[0])]

    for attempt in attempts:  # one W&B run: the same id, name, project and the run's config
        assert (attempt["id"], attempt["name"], attempt["project"]) == (run_id, "run", "trackers-test")
        assert attempt["config"]["steps"] == 4 and attempt["config"]["log"]["wandb"] is True
    assert [attempt["exit_code"] for attempt in attempts] == [143, 0]  # finished on SIGTERM, then done
    assert sorted(attempts[0]["history"]) == [1, 2, 3] and sorted(attempts[1]["history"]) == [4]
    logged = {**attempts[0]["history"], **attempts[1]["history"]}
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1]
    for row in rows:  # the same numbers as metrics.jsonl, train and eval entries
        expected = {name: value for name, value in row.items() if name != "step"}
        assert logged[row["step"]] == pytest.approx(expected, rel=1e-12), row["step"]
    assert not (workdir / "profile").exists()  # profile_steps="" (the default) traces nothing


def test_a_profile_window_writes_one_trace_and_a_run_resumed_past_it_none(tmp_path, capsys):
    from lm_core.trainer import train

    workdir = tmp_path / "run"
    train(tiny_run(tmp_path, profile_steps="2:3", eval_every=0), workdir)
    traces = sorted((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    assert f"profile: steps 2-3 traced into {workdir / 'profile'}" in capsys.readouterr().out
    train(tiny_run(tmp_path, profile_steps="2:3", eval_every=0, steps=6), workdir)  # resumes at 4, past the window
    assert sorted((workdir / "profile").rglob("*.xplane.pb")) == traces
    assert "profile:" not in capsys.readouterr().out


def test_the_profile_window_starts_and_stops_around_its_steps(tmp_path, monkeypatch):
    """Which steps a ProfileWindow traces, fresh, resumed inside the window, resumed past it, stopped inside it."""
    import jax

    from lm_core.profiling import ProfileWindow

    calls: list[str] = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))

    def run(steps: range, window: tuple[int, int] | None = (2, 3), enabled: bool = True) -> list[str]:
        calls.clear()
        profiler = ProfileWindow(window, tmp_path / "profile", enabled=enabled)
        for step in steps:
            profiler.before_step(step)
            calls.append(str(step))
            profiler.after_step(step, jax.numpy.zeros(()))
        profiler.close()
        return list(calls)

    assert run(range(1, 5)) == ["1", "start", "2", "3", "stop", "4"]
    assert run(range(3, 5)) == ["start", "3", "stop", "4"]  # resumed inside the window: its remaining steps
    assert run(range(4, 7)) == ["4", "5", "6"]  # resumed past the window
    assert run(range(1, 3)) == ["1", "start", "2", "stop"]  # stopped (signal) inside the window: closed
    assert run(range(1, 5), window=None) == run(range(1, 5), enabled=False) == ["1", "2", "3", "4"]


def test_the_fields_work_as_command_line_flags():
    from absl import flags
    from ml_collections import config_flags

    from lm_core.run_config import default_config, validate_run_config

    argv = ["train_lm", "--config.steps=4", "--config.profile_steps=2:3", "--config.log.wandb=False",
            "--config.log.wandb_mode=online", "--config.log.wandb_run_name=baseline"]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_dict("config", default_config(), flag_values=flag_values, lock_config=True,
                                             sys_argv=argv)  # the overrides are read from this argv
    flag_values(argv)
    config = holder.value
    assert (config.profile_steps, config.log.wandb_mode, config.log.wandb_run_name) == ("2:3", "online", "baseline")
    validate_run_config(config)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("log.wandb_mode", "cloud", "log.wandb_mode='cloud' is unknown; valid: offline, online, disabled"),
    ("log.wandb_project", "", "log.wandb_project='' must be a non-empty string"),
    ("profile_steps", "3:2", "profile_steps='3:2' is not a step window; valid: '' (off) or 'FIRST:LAST' with "
                             "1 <= FIRST <= LAST <= steps (4), e.g. '2:4'"),
    ("profile_steps", "0:2", "profile_steps='0:2' is not a step window"),
    ("profile_steps", "2", "profile_steps='2' is not a step window"),
    ("profile_steps", "a:b", "profile_steps='a:b' is not a step window"),
    ("profile_steps", "3:9", "profile_steps='3:9' ends after the run's last step (steps=4); valid:"),
])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tmp_path, field, value, message):
    from lm_core.trainer import train

    config = tiny_run(tmp_path)
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(UserError) as error:
        train(config, tmp_path / "run")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_wandb_on_without_wandb_installed_says_pip_install_wandb(tmp_path, monkeypatch):
    import importlib.util

    from lm_core.run_config import validate_run_config

    config = tiny_run(tmp_path)
    validate_run_config(config)  # off: wandb is never looked for
    config.log.wandb = True
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"^log.wandb=True needs the wandb package, .*: pip install wandb") as error:
        validate_run_config(config)
    assert "\n" not in str(error.value)


def test_the_log_defaults_are_the_writers_and_a_config_without_a_log_block_reads_as_off():
    import ml_collections

    from lm_core.run_config import default_config
    from lm_core.wandb_writer import DEFAULTS, check_log_config, wandb_options

    assert default_config().log.to_dict() == DEFAULTS
    config = ml_collections.ConfigDict({"steps": 4})
    check_log_config(config)
    assert wandb_options(config) is None
    # A config file can hold values a flag could not (a flag keeps the field's type); they are refused by name.
    for log, message in [({"wandb": "yes"}, "log.wandb='yes' must be True or False"),
                         ({"wandb_mode": "offline", "tensorboard": False}, "log.tensorboard is not a log field")]:
        with pytest.raises(UserError, match=f"^{message}"):
            check_log_config(ml_collections.ConfigDict({"log": log}))
