"""The training loop every experiment shares: config -> data -> sharded state -> steps, eval, logs, checkpoints.

Paper packages customise it through a `TrainTask` (lm_core.task: their train step's parts, data, evaluation)
instead of copying the loop; the run config is lm_core.run_config's, the data lm_core.run_data's, and finished
runs are read by lm_core.trained_runs. Rerunning `train` with the same workdir resumes from the latest
checkpoint: model, optimizer, step, RNG and data position, so an interrupted run ends bit-identical to an
uninterrupted one (on CPU). One run trains in a workdir at a time (lm_core.workdir_lock), and only finite states
are kept: a step whose objective, gradient norm or parameters are not finite is not applied, the state before it
is saved and the run stops.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lm_core import distributed, flops, sharding
from lm_core.atomic_files import write_json_atomically
from lm_core.checkpoint import (
    CHECKPOINTS,
    Checkpointer,
    abstract_like,
    check_same_model,
    exists_on_process_0,
    prove_writable,
)
from lm_core.config import ModelConfig
from lm_core.errors import RunStopped, TrainingDiverged, UserError
from lm_core.loss import cross_entropy
from lm_core.metrics import MetricsLog, Progress
from lm_core.optim import learning_rate_schedule
from lm_core.profiling import ProfileWindow, parse_profile_steps
from lm_core.run_config import model_config_from, optimizer_config_from, validate_run_config
from lm_core.run_data import HostBatch
from lm_core.task import Batch, Evaluation, StepParts, TrainTask
from lm_core.train_step import TrainState, check_batch_fits, init_train_state, make_train_step
from lm_core.trained_runs import check_same_meta
from lm_core.wandb_writer import wandb_options
from lm_core.workdir_lock import WorkdirLock


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    last_metrics: dict[str, Any]
    model_config: ModelConfig
    stopped_by_signal: bool = False


class StopRequested:
    """Turns SIGTERM/SIGINT into a stop between steps, so the current step finishes and is saved.

    One process: the signal sets the flag. Several (multi-host): every process must save the SAME step, or the
    collective save waits forever for the processes that went on. SIGTERM is then left to JAX's preemption
    service (`jax.distributed` installs its notifier), which agrees on a step all processes reach
    (`multihost_utils.reached_preemption_sync_point`); the loop asks it every step (`should_stop`).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._multi_process = jax.process_count() > 1

    def __enter__(self) -> StopRequested:
        signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer for the same step)."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
        return self.signal_name is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_eval_fn(graphdef: nnx.GraphDef, evaluation: Evaluation | None) -> Callable:
    def evaluate(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")).logits
        _, metrics = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        sums = {"nll": metrics["nll"], "tokens": metrics["tokens"]}
        if evaluation is not None:
            sums.update(evaluation.sums(logits, batch))
        return sums

    return jax.jit(evaluate)


def summarise_eval(sums: dict[str, float], chars: float) -> dict[str, float]:
    """Per-token means of the summed statistics, plus bits per character when characters were counted."""
    tokens = max(sums.pop("tokens"), 1.0)
    out = {"eval_loss": sums.pop("nll") / tokens}
    if chars > 0:
        out["eval_bpc"] = out["eval_loss"] * tokens / (chars * math.log(2))
    out.update({f"eval_{name}": value / tokens for name, value in sums.items()})
    return out


def _host_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = next(iter(batch.values())).shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return {name: value[start:start + rows] for name, value in batch.items()}


def train_to_end(config: ml_collections.ConfigDict, workdir: str | Path, task: TrainTask | None = None
                 ) -> TrainResult:
    """`train`, raising `RunStopped` when a signal stopped it: what a pipeline of several runs calls, so a stop
    stops the pipeline (no later run is built on an unfinished one, none is marked finished) and a rerun resumes
    from the saved checkpoint."""
    result = train(config, workdir, task)
    if result.stopped_by_signal:
        raise RunStopped(f"run {result.workdir} stopped at step {result.step} of {config.steps}; rerun the same "
                         "command to resume")
    return result


def train(config: ml_collections.ConfigDict, workdir: str | Path, task: TrainTask | None = None) -> TrainResult:
    """Train (or resume) the run described by `config` in `workdir`, which no other run may train in meanwhile
    (lm_core.workdir_lock: a second one is refused in one line)."""
    task = task or TrainTask()
    workdir = Path(workdir).absolute()
    validate_run_config(config)
    with WorkdirLock(workdir, jax.process_index()) as lock:
        lock.acquire(create=False)  # an existing workdir is locked before its checkpoints are read
        return _train_locked(config, workdir, task, lock)


@dataclasses.dataclass
class _Run:
    """What the step loop works with, built (every input check passed) by `_start_run`; `state` advances."""

    config: ml_collections.ConfigDict
    workdir: Path
    task: TrainTask
    mesh: Mesh
    model_config: ModelConfig
    checkpointer: Checkpointer
    loader: Any
    eval_batches: list[HostBatch]
    state: TrainState
    train_step: Callable
    eval_fn: Callable
    flops_per_token: float
    peak_flops_per_s: float  # of the whole job, for MFU
    learning_rate: Callable[[int], Any]  # the optimizer's schedule, for the logged rows
    meta: dict[str, Any]  # saved with every checkpoint
    chars_seen: float  # counted from the run's start, also across a resume (a sweep turns it into FLOPs spent)


def _train_locked(config: ml_collections.ConfigDict, workdir: Path, task: TrainTask, lock: WorkdirLock
                  ) -> TrainResult:
    run = _start_run(config, workdir, task, lock)
    start_step = int(run.state.step)
    log = MetricsLog(workdir, resume_step=start_step, is_main=jax.process_index() == 0, wandb=wandb_options(config))
    profiler = ProfileWindow(parse_profile_steps(config.get("profile_steps", ""), config.steps), workdir / "profile",
                             enabled=jax.process_index() == 0)
    stop_signal, last_row = _run_steps(run, log, profiler)
    run.checkpointer.close()
    profiler.close()
    log.close(exit_code=143 if stop_signal else 0)
    return TrainResult(workdir, int(run.state.step), last_row, run.model_config,
                       stopped_by_signal=stop_signal is not None)


def _start_run(config: ml_collections.ConfigDict, workdir: Path, task: TrainTask, lock: WorkdirLock) -> _Run:
    """Check the inputs, then prepare the workdir and the (fresh or resumed) state and compiled steps."""
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
    check_batch_fits(mesh, config.data.global_batch_size, config.grad_accum_steps)

    # Everything that can reject the user's input runs before anything is written to the workdir.
    checkpointer, latest, saved_meta = _open_checkpoints(config, workdir, task, model_config)
    data = task.make_data(config, workdir, model_config)
    if latest is not None:
        _restore_data_position(checkpointer, latest, data.loader, saved_meta, config)

    _prepare_workdir(config, workdir, data.tokenizer, lock)
    if checkpointer is None:
        checkpointer = Checkpointer(workdir / CHECKPOINTS, keep=config.keep_checkpoints,
                                    save_every=config.checkpoint_every)
    parts = task.step(config)
    graphdef, state, shardings = _start_state(parts, task, mesh, config.seed, checkpointer, latest)
    train_step = make_train_step(graphdef, parts.loss_fn, parts.optimizer, mesh, shardings,
                                 grad_accum_steps=config.grad_accum_steps)
    meta = {"model": model_config.to_dict(), "tokenizer_vocab_size": data.tokenizer.vocab_size,
            "data_source": config.data.source, **task.meta}
    return _Run(config, workdir, task, mesh, model_config, checkpointer, data.loader, data.eval_batches, state,
                train_step, make_eval_fn(graphdef, task.evaluation), parts.training_flops_per_token,
                flops.total_peak_flops_per_s()[0], learning_rate_schedule(optimizer_config_from(config)), meta,
                float(saved_meta.get("chars_seen", 0.0)))


def _restore_data_position(checkpointer: Checkpointer, step: int, loader: Any, saved_meta: dict[str, Any],
                           config: ml_collections.ConfigDict) -> None:
    """Put `loader` at checkpoint `step`'s data position, before anything is written: a resume on other data
    than the checkpoint's is refused here (the loader checks size, seed, tokenizer and a content digest)."""
    position = checkpointer.read_data(step)
    if not position:  # an imported model's step 0 (lm_core.hf_workdir): nothing to continue
        return
    try:
        loader.restore(position)
    except UserError as error:
        raise UserError(f"{error} (the checkpoint trained on data.source={saved_meta.get('data_source', '?')!r}, "
                        f"this run reads {config.data.source!r})") from None


def _run_steps(run: _Run, log: MetricsLog, profiler: ProfileWindow) -> tuple[str | None, dict[str, Any]]:
    """Train from the state's step to config.steps: (the signal that stopped it or None, the last logged row).

    A step's metrics are read back after the NEXT step is dispatched, so the host prepares batch k + 1 while the
    device runs step k. The next step gets the step's finite flag on the device (make_train_step's `proceed`) and
    is not applied either when it is False, so a late read still finds the last finite state. Steps that save,
    evaluate or stop are read back at once. A non-finite step saves the last finite state and raises
    TrainingDiverged (`_stop_diverged`)."""
    config, checkpointer = run.config, run.checkpointer
    start_step = int(run.state.step)
    loop = _StepLoop(log, profiler, _Throughput(config, start_step), Progress(config.steps, start_step))
    pending: _Dispatched | None = None
    with StopRequested() as stop:
        for step in range(start_step + 1, config.steps + 1):
            profiler.before_step(step)
            position = run.loader.state()  # where this step's batch starts: saved with the state before it
            host_batch = run.loader.next()
            chars = _batch_chars(run.mesh, host_batch.pop("chars"))
            run.state, metrics = run.train_step(run.state, distributed.global_batch(run.mesh, host_batch),
                                                pending.metrics["finite"] if pending else None)
            if pending:
                _read_back(run, pending, loop)
            pending = _Dispatched(step, metrics, position, chars)
            stopping = stop.should_stop(step)
            saving = checkpointer.should_save(step) or step == config.steps or stopping
            if saving or _evaluates(config, step):
                _read_back(run, pending, loop)
                pending = None
            if saving:
                checkpointer.save(step, run.state, run.loader.state(), {**run.meta, "chars_seen": run.chars_seen},
                                  wait=stopping)
            profiler.after_step(step, (run.state, metrics))
            if stopping:
                print(f"received {stop.signal_name}: saved checkpoint at step {step} in {checkpointer.directory}; "
                      "rerun the same command to resume", flush=True)
                return stop.signal_name, loop.last_row
    return None, loop.last_row


class _Dispatched(NamedTuple):
    """A step handed to the device whose metrics the host has not read yet."""

    step: int
    metrics: dict[str, Any]
    position: dict[str, Any]  # where its batch starts in the data: a diverged stop saves it, to retry the batch
    chars: float | jax.Array  # characters in its (global) batch, a device scalar in a multi-process job


@dataclasses.dataclass
class _StepLoop:
    """Where read-back steps go: the metrics log, the profiler, the throughput window, progress lines."""

    log: MetricsLog
    profiler: ProfileWindow
    throughput: _Throughput
    progress: Progress
    last_row: dict[str, Any] = dataclasses.field(default_factory=dict)


def _batch_chars(mesh: Mesh, host_chars: np.ndarray) -> float | jax.Array:
    """Characters of the global batch: this process's rows' count, summed over processes on the device (dispatched,
    read back with the step's metrics, so the host does not wait for the other hosts here)."""
    if jax.process_count() == 1:
        return float(np.sum(host_chars))
    return jnp.sum(distributed.global_batch(mesh, {"chars": host_chars.astype(np.int32)})["chars"])


def _evaluates(config: ml_collections.ConfigDict, step: int) -> bool:
    return bool(config.eval_every) and (step % config.eval_every == 0 or step == config.steps)


def _read_back(run: _Run, done: _Dispatched, loop: _StepLoop) -> None:
    """Wait for step `done` and take its metrics: stop if it was not finite, count it, log it on a logging step."""
    # The one value read back every step (a bool): False = the step was not applied.
    if not bool(done.metrics["finite"]):
        loop.profiler.close()
        loop.log.close(exit_code=1)
        _stop_diverged(done.step, done.metrics, run.checkpointer, run.state, done.position,
                       {**run.meta, "chars_seen": run.chars_seen})
    run.checkpointer.raise_if_save_failed()
    run.chars_seen += float(done.chars)
    loop.throughput.count_step()
    if done.step % run.config.log_every == 0 or done.step == run.config.steps:
        loop.last_row = _logged_row(run, done.step, done.metrics, loop.throughput)
        loop.log.write(loop.last_row)
        loop.progress.print(done.step, loop.last_row)


class _Throughput:
    """Tokens per second over the steps since the last logged one, and tokens seen since the run's start."""

    def __init__(self, config: ml_collections.ConfigDict, start_step: int):
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.tokens_seen = float(start_step * self.tokens_per_step)
        self.window_start, self.window_steps = time.monotonic(), 0

    def count_step(self) -> None:
        self.tokens_seen += self.tokens_per_step
        self.window_steps += 1

    def take_tokens_per_s(self) -> float:
        """The window's rate; starts the next window."""
        elapsed = max(time.monotonic() - self.window_start, 1e-9)
        rate = self.window_steps * self.tokens_per_step / elapsed
        self.window_start, self.window_steps = time.monotonic(), 0
        return rate


def _logged_row(run: _Run, step: int, metrics: dict[str, Any], throughput: _Throughput) -> dict[str, Any]:
    """The metrics.jsonl row of a logged step, with the evaluation when this step evaluates."""
    config = run.config
    tokens_per_s = throughput.take_tokens_per_s()
    row = _train_row(step, metrics, tokens_per_s=tokens_per_s,
                     mfu=flops.mfu(tokens_per_s, run.flops_per_token, run.peak_flops_per_s),
                     learning_rate=float(run.learning_rate(step - 1)), tokens=throughput.tokens_seen,
                     chars=run.chars_seen)
    if _evaluates(config, step):  # read back at once (`_run_steps`): run.state is this step's
        row.update(_evaluate(run))
    return row


def _evaluate(run: _Run) -> dict[str, float]:
    """The evaluation batches' summed statistics per token (and bits per character), as the task reports them."""
    sums: dict[str, float] = {}
    chars = 0.0
    for batch in run.eval_batches:
        chars += float(np.sum(batch["chars"]))
        model_batch = {k: v for k, v in batch.items() if k != "chars"}
        out = run.eval_fn(run.state.params, distributed.global_batch(run.mesh, _host_rows(model_batch)))
        for name, value in out.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    if not sums:
        return {}
    summary = summarise_eval(sums, chars)
    row = run.task.evaluation.row if run.task.evaluation is not None else None
    return row(summary) if row is not None else summary


def _open_checkpoints(config: ml_collections.ConfigDict, workdir: Path, task: TrainTask, model_config: ModelConfig
                      ) -> tuple[Checkpointer | None, int | None, dict[str, Any]]:
    """(checkpointer, latest step, its meta) of a workdir that has checkpoints, refusing ones of another setup;
    (None, None, {}) for a fresh workdir, whose checkpoint directory is created only once the inputs are valid."""
    if not exists_on_process_0(workdir / CHECKPOINTS):
        return None, None, {}
    checkpointer = Checkpointer(workdir / CHECKPOINTS, keep=config.keep_checkpoints,
                                save_every=config.checkpoint_every)
    latest = checkpointer.latest_step()
    if latest is None:
        return checkpointer, None, {}
    saved_meta = checkpointer.read_meta(latest)
    check_same_model(saved_meta, model_config, workdir)
    check_same_meta(saved_meta, task.meta, workdir)
    return checkpointer, latest, saved_meta


def _start_state(parts: StepParts, task: TrainTask, mesh: Mesh, seed: int, checkpointer: Checkpointer,
                 latest: int | None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, shardings): the latest checkpoint's state on a resume (its data position is restored
    before, by `_restore_data_position`), else a fresh state passed through `task.initialize`."""
    graphdef, state, shardings = init_train_state(parts.create_model, parts.optimizer, mesh, seed)
    if latest is not None:
        restored = checkpointer.restore(latest, abstract_like(state, shardings))
        print(f"resumed from {checkpointer.directory / str(latest)}", flush=True)
        return graphdef, restored.state, shardings
    if task.initialize is not None:
        state = task.initialize(state)
    return graphdef, state, shardings


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: Path, tokenizer: Any, lock: WorkdirLock) -> None:
    """Lock (creating) the workdir, prove its checkpoint directory writable, write config.json and the tokenizer."""
    lock.acquire()
    # Every process writes its shards of a checkpoint, so every process proves it can, before the first step
    # (an unwritable directory would otherwise surface inside Orbax after the whole run, see lm_core.checkpoint).
    prove_writable(workdir / CHECKPOINTS)
    if jax.process_index() == 0:
        write_json_atomically(workdir / "config.json", config.to_dict(), sort_keys=True)
        from lm_core.hf_tokenizer import PRETRAINED_DIRNAME, PretrainedTokenizer

        if isinstance(tokenizer, PretrainedTokenizer):
            if not (workdir / PRETRAINED_DIRNAME).exists():
                tokenizer.save(workdir / PRETRAINED_DIRNAME)
        elif hasattr(tokenizer, "save") and not (workdir / "tokenizer.model").exists():
            tokenizer.save(workdir / "tokenizer.model")


def _train_row(step: int, metrics: dict[str, Any], *, tokens_per_s: float, mfu: float, learning_rate: float,
               tokens: float, chars: float) -> dict[str, Any]:
    """One metrics.jsonl row of a logged step (evaluation entries are added by the caller): the loop's entries,
    then every other scalar the loss function returned (MoMa's text_loss and routing statistics, KVP's loss terms,
    the step's summed nll); a loss metric named like one of the loop's entries (its `tokens`) is not repeated."""
    row = {"step": step, "loss": float(metrics["loss"]), "tokens_per_s": tokens_per_s, "mfu": mfu,
           "grad_norm": float(metrics["grad_norm"]), "z_loss": float(metrics["z_loss"]),
           "learning_rate": learning_rate, "tokens": int(tokens), "chars": chars}
    extra = {name: float(value) for name, value in metrics.items()
             if np.ndim(value) == 0 and name not in row and name != "finite"}
    return {**row, **extra}


def _stop_diverged(step: int, metrics: dict[str, Any], checkpointer: Checkpointer, state: TrainState,
                  position: dict[str, Any], meta: dict[str, Any]) -> NoReturn:
    """Save `state` (the train step left it at step - 1, the last finite one) with the data position of `step`'s
    batch, so a rerun retries that batch, then raise TrainingDiverged naming the step and the likely causes."""
    last = step - 1
    if last > 0:
        checkpointer.save(last, state, position, meta)  # a no-op when step `last` is saved already
    checkpointer.close()
    objective, grad_norm = float(metrics["objective"]), float(metrics["grad_norm"])
    what = (f"the objective ({objective})" if not math.isfinite(objective) else
            f"the gradient norm ({grad_norm})" if not math.isfinite(grad_norm) else "an updated parameter")
    newest = checkpointer.latest_step()
    kept = (f"the newest checkpoint {checkpointer.directory / str(newest)} holds the last finite state"
            if newest is not None else "nothing was saved")
    raise TrainingDiverged(f"training diverged at step {step}: {what} is not finite, so the step was not applied "
                           f"and {kept}; likely causes: learning rate too high (lower optimizer.learning_rate or "
                           "raise optimizer.warmup_steps), bad data in this step's batch, or floating-point overflow "
                           "(try model.dtype=float32 or a larger z_loss)")
