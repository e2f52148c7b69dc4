"""The training loop every experiment shares: config -> data -> sharded state -> steps, eval, logs, checkpoints.

Paper packages customise it through a `TrainTask` (their loss, FFN factory, extra evaluation) instead of
copying the loop. Rerunning `train` with the same workdir resumes from the latest checkpoint: model, optimizer,
step, RNG and data position, so an interrupted run ends bit-identical to an uninterrupted one (on CPU). One run
trains in a workdir at a time (lm_core.workdir_lock), and only finite states are kept: a step whose objective,
gradient norm or parameters are not finite is not applied, the state before it is saved and the run stops.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lm_core import distributed, flops, sharding
from lm_core.atomic_files import write_json_atomically
from lm_core.checkpoint import (
    Checkpointer,
    abstract_like,
    check_same_model,
    exists_on_process_0,
    latest_meta,
    prove_writable,
)
from lm_core.config import ModelConfig, check_finite_numbers
from lm_core.errors import RunStopped, TrainingDiverged, UserError
from lm_core.layers import FFNFactory
from lm_core.loss import cross_entropy, next_token_loss
from lm_core.metrics import MetricsLog, Progress, read_metrics
from lm_core.model import Transformer
from lm_core.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from lm_core.profiling import ProfileWindow, parse_profile_steps
from lm_core.train_step import (
    LossFn,
    TrainState,
    abstract_with_shardings,
    check_batch_fits,
    init_train_state,
    make_train_step,
    param_shardings,
)
from lm_core.wandb_writer import check_log_config, wandb_options
from lm_core.workdir_lock import WorkdirLock

Array = jax.Array
Batch = dict[str, Array]
# (logits [batch, seq, vocab], batch) -> {name: summed statistic}; the trainer divides each sum by the token count.
EvalSumsFn = Callable[[Array, Batch], dict[str, Array]]
HostBatch = dict[str, np.ndarray]


def default_config() -> ml_collections.ConfigDict:
    """Every field a training entrypoint understands; config files start from this and override."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.steps = 200
    config.grad_accum_steps = 1
    config.z_loss = 1e-4
    config.loss_chunk_tokens = 0  # > 0: output layer + loss in chunks of this many tokens per device (saves memory)
    # Derived fields stay 0 ("from the other fields") so a config that changes d_model or num_heads gets a
    # matching head_dim, d_ff and num_kv_heads instead of the defaults' resolved values.
    config.model = ml_collections.ConfigDict(dict(ModelConfig(vocab_size=1024).to_dict(), head_dim=0, d_ff=0,
                                                  num_kv_heads=0))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    config.data = ml_collections.ConfigDict(dict(
        source="builtin",  # builtin | files:<glob> | tfds:<name>[/<config>]
        data_dir="",  # where TFDS datasets are prepared/read ("" = ~/.cache/lm_core/tfds)
        # sentencepiece (BPE trained at model.vocab_size) | byte | pretrained (tokenizer_path, its own special ids;
        # copied to workdir/tokenizer/, see lm_core.hf_tokenizer.PretrainedTokenizer)
        tokenizer="sentencepiece",
        tokenizer_path="",  # pretrained only: a directory with tokenizer.json and/or tokenizer.model, or one file
        tokenizer_seed=0,
        seq_len=128,
        global_batch_size=16,
        whole_documents=False,  # True: a document that fits in one row is never split over two (costs padding)
        # How a tokens:DIR dataset is read (text sources always tokenize in the training process): grain, where
        # each host builds only its own rows ahead of the step (lm_core.data.grain_pipeline), or stream, where
        # every host packs the whole global batch when it is needed (needed for whole_documents).
        loader="grain",
        loader_workers=0,  # grain: worker processes that build the batches (0: threads of the training process)
    ))
    optimizer = OptimizerConfig()
    config.optimizer = ml_collections.ConfigDict(dataclasses.asdict(optimizer))
    config.optimizer.total_steps = 0  # 0 = the run's `steps`
    config.log_every = 10
    config.eval_every = 100
    config.eval_batches = 4
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    # Weights & Biases next to metrics.jsonl and TensorBoard (lm_core.wandb_writer; needs `pip install wandb`).
    # With wandb=True process 0 logs every metrics.jsonl row, at its step, into one W&B run (files in workdir/wandb/)
    # whose id is kept in workdir/wandb_run_id, so a resumed run continues the same W&B run.
    config.log = ml_collections.ConfigDict(dict(
        wandb=False,
        wandb_project="lm_core",
        # offline: no network, no login (upload later with `wandb sync DIR/wandb/offline-run-*`); online: needs
        # `wandb login` or WANDB_API_KEY; disabled: W&B's no-op run. This field decides, not WANDB_MODE.
        wandb_mode="offline",
        wandb_run_name="",  # "" = the workdir's name
    ))
    # A jax.profiler trace of steps FIRST to LAST, both inclusive, into workdir/profile/ (lm_core.profiling), e.g.
    # "100:103"; "" = off. A string rather than two ints: one flag (--config.profile_steps=100:103) that reads as
    # the window, with "" for off instead of a sentinel number. A window ending after `steps` is refused (not
    # clipped), a run resumed past the window traces nothing, and only process 0 traces.
    config.profile_steps = ""
    return config


@dataclasses.dataclass
class TrainData:
    """What the loop reads: a run's tokenizer, its training stream and its evaluation batches.

    The default (`text_train_data`) packs a text source; a paper with other data (MoMa's image-caption documents)
    returns its own through `TrainTask.make_data`. Batches are host rows with the keys the loss reads plus a
    per-row "chars" count, which the loop pops (bits per character) before the batch reaches the model.
    """

    # .vocab_size; saved as workdir/tokenizer.model (a pretrained one as workdir/tokenizer/) when it has .save and
    # none is there yet
    tokenizer: Any
    loader: Any  # .next() -> HostBatch, .state() -> JSON-able dict, .restore(state): the exact-resume contract
    eval_batches: list[HostBatch]


@dataclasses.dataclass
class TrainTask:
    """What a paper package changes about training; the defaults train a plain language model."""

    loss_fn: LossFn | None = None  # (model, batch, rng) -> (loss, metrics); default: next-token CE + z-loss
    ffn_factory: FFNFactory | None = None
    # Extra summed evaluation statistics (logits, batch) -> {name: sum}, reported per token as eval_<name>.
    eval_sums_fn: EvalSumsFn | None = None
    # Builds the trained module from (model config, seed); default: Transformer(config, ffn_factory=...).
    # It must create its nnx.Rngs inside (it runs under jit so parameters are born sharded).
    create_model: Callable[[ModelConfig, int], nnx.Module] | None = None
    # Applied to a fresh (not resumed) state, e.g. to load pretrained weights into part of the model.
    initialize: Callable[[TrainState], TrainState] | None = None
    make_optimizer: Callable[[OptimizerConfig], optax.GradientTransformation] | None = None
    training_flops_per_token: float | None = None  # for MFU when the module is not one plain Transformer
    # Saved with every checkpoint and compared on resume (a mismatch is refused, naming the key).
    extra_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    # (config, workdir, model config) -> TrainData; default: the text source config.data.source (text_train_data).
    # It runs before anything is written, so it may raise UserError for bad data; the loop restores the loader on
    # resume, so a fresh position set here (e.g. an upcycled run continuing its source's stream) only counts once.
    make_data: Callable[[ml_collections.ConfigDict, Path, ModelConfig], TrainData] | None = None
    # The eval summary ({"eval_loss", "eval_<name>": sum / tokens, ...}) -> the entries to log instead, for
    # statistics whose denominator is not the token count (e.g. per-modality losses over that modality's tokens).
    eval_row_fn: Callable[[dict[str, float]], dict[str, float]] | None = None


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


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def optimizer_config_from(config: ml_collections.ConfigDict) -> OptimizerConfig:
    values = config.optimizer.to_dict()
    values["total_steps"] = values.get("total_steps") or config.steps
    try:
        return OptimizerConfig(**values)
    except TypeError as error:
        raise UserError(f"bad optimizer config: {error}") from error


def validate_run_config(config: ml_collections.ConfigDict) -> None:
    check_finite_numbers(config.to_dict())
    for name in ("steps", "log_every", "eval_batches", "keep_checkpoints", "grad_accum_steps"):
        value = config[name]
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name}={value!r} must be a positive integer")
    for name in ("eval_every", "checkpoint_every"):
        if not isinstance(config[name], int) or config[name] < 0:
            raise UserError(f"{name}={config[name]!r} must be an integer >= 0 (0 = never)")
    for name in ("seq_len", "global_batch_size"):
        if not isinstance(config.data[name], int) or config.data[name] <= 0:
            raise UserError(f"data.{name}={config.data[name]!r} must be a positive integer")
    # numpy's generators (the data order) take no negative seed: refused here, not at the first batch
    if not isinstance(config.seed, int) or config.seed < 0:
        raise UserError(f"seed={config.seed!r} must be an integer >= 0")
    if config.data.tokenizer not in ("sentencepiece", "byte", "pretrained"):
        raise UserError(f"data.tokenizer={config.data.tokenizer!r} is unknown; valid: sentencepiece, byte, pretrained")
    if config.data.tokenizer == "pretrained" and not config.data.get("tokenizer_path"):
        raise UserError("data.tokenizer=pretrained needs data.tokenizer_path; valid: a directory holding "
                        "tokenizer.json and/or tokenizer.model (plus optional tokenizer_config.json), or one such file")
    if not config.z_loss >= 0:
        raise UserError(f"z_loss={config.z_loss} must be >= 0")
    check_log_config(config)
    parse_profile_steps(config.get("profile_steps", ""), config.steps)


def train_or_reuse_tokenizer(config: ml_collections.ConfigDict, workdir: Path, train_texts: Any,
                             model_config: ModelConfig) -> Any:
    """The run's tokenizer: the copy in the workdir if there is one (resume), else trained (or taken from the cache).

    The caller saves a newly trained one into the workdir once the run's inputs have all been validated."""
    from lm_core import tokenizer as tok

    if config.data.tokenizer != "sentencepiece" or (workdir / tok.MODEL_FILENAME).exists():
        tokenizer = run_tokenizer(config, workdir)
    else:
        spec = tok.TokenizerSpec(vocab_size=model_config.vocab_size, seed=config.data.tokenizer_seed)
        tokenizer = tok.train_tokenizer(_iterate(train_texts), spec, cache_dir=tokenizer_cache_dir())
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size}); use model.vocab_size >= {tokenizer.vocab_size}")
    return tokenizer


def _pretrained_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    """The workdir's copy (resume: the files the run started with), else data.tokenizer_path."""
    from lm_core.hf_tokenizer import PRETRAINED_DIRNAME, PretrainedTokenizer

    saved, path = workdir / PRETRAINED_DIRNAME, config.data.get("tokenizer_path", "")
    if not saved.is_dir() and not path:
        raise UserError(f"{workdir} has no {PRETRAINED_DIRNAME}/ and data.tokenizer_path is empty; valid: the workdir "
                        "of a data.tokenizer=pretrained run, or a config naming data.tokenizer_path")
    return PretrainedTokenizer.load(saved if saved.is_dir() else path)


def run_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    """The tokenizer a trained run in `workdir` used, for any data.tokenizer (what load_trained_model returns)."""
    from lm_core import tokenizer as tok

    kind = config.data.get("tokenizer", "sentencepiece")
    if kind == "byte":
        # the saved copy carries the run's reserved ids (MoMa's image codes sit there); a new run has none yet
        saved = workdir / tok.MODEL_FILENAME
        return tok.ByteTokenizer.load(saved) if saved.exists() else tok.ByteTokenizer()
    if kind == "pretrained":
        return _pretrained_tokenizer(config, workdir)
    return tok.Tokenizer.load(workdir / tok.MODEL_FILENAME)


def tokenizer_cache_dir() -> Path:
    """Trained tokenizers are cached here (LM_CORE_CACHE overrides), so a sweep trains each one once."""
    return Path(os.environ.get("LM_CORE_CACHE", Path.home() / ".cache" / "lm_core")) / "tokenizers"


def text_train_data(config: ml_collections.ConfigDict, workdir: Path, model_config: ModelConfig) -> TrainData:
    """The default data: a text source (config.data.source) packed into rows by LMDataLoader."""
    from lm_core.data import LMDataLoader, get_text_source, iter_eval_batches

    source = get_text_source(config.data.source, data_dir=config.data.data_dir or None)
    train_texts = source.split("train")
    tokenizer = train_or_reuse_tokenizer(config, workdir, train_texts, model_config)
    loader = LMDataLoader(train_texts, tokenizer, seq_len=config.data.seq_len,
                          global_batch_size=config.data.global_batch_size, seed=config.seed,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          whole_documents=config.data.get("whole_documents", False))
    eval_batches = list(iter_eval_batches(source.split("validation"), tokenizer, config.data.seq_len,
                                          config.data.global_batch_size, config.eval_batches))
    return TrainData(tokenizer, loader, eval_batches)


def _iterate(texts: Any) -> Iterator[str]:
    for i in range(len(texts)):
        yield texts[i]


def make_eval_fn(graphdef: nnx.GraphDef, eval_sums_fn: EvalSumsFn | None) -> Callable:
    def evaluate(params: nnx.State, batch: Batch) -> dict[str, Array]:
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")).logits
        _, metrics = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        sums = {"nll": metrics["nll"], "tokens": metrics["tokens"]}
        if eval_sums_fn is not None:
            sums.update(eval_sums_fn(logits, batch))
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


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What the train step is made of, for a config and task: `train` runs it, experiments.compile_check compiles
    it ahead of time for a mesh, from the same construction."""

    model_config: ModelConfig
    optimizer: optax.GradientTransformation
    create_model: Callable[[], nnx.Module]  # zero-argument; makes its own Rngs so init can run under jit
    loss_fn: LossFn
    training_flops_per_token: float  # the analytic count MFU is measured against


def step_parts(config: ml_collections.ConfigDict, task: TrainTask | None = None) -> StepParts:
    task = task or TrainTask()
    model_config = model_config_from(config)
    optimizer = (task.make_optimizer or make_optimizer)(optimizer_config_from(config))

    def create_model() -> nnx.Module:
        if task.create_model is not None:
            return task.create_model(model_config, config.seed)
        return Transformer(model_config, rngs=nnx.Rngs(config.seed), ffn_factory=task.ffn_factory)

    loss_fn = task.loss_fn or functools.partial(next_token_loss, z_loss_weight=config.z_loss,
                                                chunk_tokens=config.loss_chunk_tokens)
    flops_per_token = (task.training_flops_per_token
                       or flops.flops_per_token(model_config, config.data.seq_len).training)
    return StepParts(model_config, optimizer, create_model, loss_fn, flops_per_token)


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
    data = (task.make_data or text_train_data)(config, workdir, model_config)
    if latest is not None:
        _restore_data_position(checkpointer, latest, data.loader, saved_meta, config)

    _prepare_workdir(config, workdir, data.tokenizer, lock)
    if checkpointer is None:
        checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                    save_every=config.checkpoint_every)
    parts = step_parts(config, task)
    graphdef, state, shardings = _start_state(parts, task, mesh, config.seed, checkpointer, latest)
    train_step = make_train_step(graphdef, parts.loss_fn, parts.optimizer, mesh, shardings,
                                 grad_accum_steps=config.grad_accum_steps)
    meta = {"model": model_config.to_dict(), "tokenizer_vocab_size": data.tokenizer.vocab_size,
            "data_source": config.data.source, **task.extra_meta}
    return _Run(config, workdir, task, mesh, model_config, checkpointer, data.loader, data.eval_batches, state,
                train_step, make_eval_fn(graphdef, task.eval_sums_fn), parts.training_flops_per_token,
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
    return run.task.eval_row_fn(summary) if run.task.eval_row_fn is not None else summary


def _open_checkpoints(config: ml_collections.ConfigDict, workdir: Path, task: TrainTask, model_config: ModelConfig
                      ) -> tuple[Checkpointer | None, int | None, dict[str, Any]]:
    """(checkpointer, latest step, its meta) of a workdir that has checkpoints, refusing ones of another setup;
    (None, None, {}) for a fresh workdir, whose checkpoint directory is created only once the inputs are valid."""
    if not exists_on_process_0(workdir / "checkpoints"):
        return None, None, {}
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                save_every=config.checkpoint_every)
    latest = checkpointer.latest_step()
    if latest is None:
        return checkpointer, None, {}
    saved_meta = checkpointer.read_meta(latest)
    check_same_model(saved_meta, model_config, workdir)
    check_same_meta(saved_meta, task.extra_meta, workdir)
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
    prove_writable(workdir / "checkpoints")
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


# TrainTask.extra_meta keys that checkpoints written before they existed do not have: such a checkpoint is accepted.
# "built_on": which upstream runs (and which state of them, `run_state`) a run started from: the KVP pipeline's
# base and auxiliary runs, an upcycled MoMa run's seed (also what MoMa's auxiliary routers were trained on).
RECORDED_SINCE = ("built_on",)


def run_state(directory: Path) -> str | None:
    """A run's latest checkpoint as a short string: its step and its logged loss there (two trainings that differ
    end at different losses, a rerun of the same one at the same), or its import source; None: none yet. What a
    run built on it records as "built_on", so it is refused once that run has trained on or been replaced."""
    step, meta = latest_meta(directory / "checkpoints")
    if step is None:
        return None
    losses = [row["loss"] for row in read_metrics(directory / "metrics.jsonl") if row.get("step") == step]
    origin = (f"loss {losses[-1]!r}" if losses else f"imported from {meta['imported_from']}"
              if "imported_from" in meta else "no logged loss")
    return f"step {step}, {origin}"


def differing_meta(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The keys of `expected` whose saved value differs (compared as JSON), a key of RECORDED_SINCE that `saved`
    predates excepted."""
    return [key for key, value in expected.items() if _jsonable(saved.get(key)) != _jsonable(value)
            and (key in saved or key not in RECORDED_SINCE)]


def check_same_meta(saved: dict[str, Any], expected: dict[str, Any], workdir: Path) -> None:
    differing = differing_meta(saved, expected)
    if differing:
        details = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {expected[key]!r}" for key in differing)
        stale = (" (the run it was built on has changed since: move the stale run away to redo it)"
                 if "built_on" in differing else "")
        raise UserError(f"{workdir} holds a checkpoint of a different setup ({details}){stale}; use another "
                        "--workdir")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_config_json(workdir: str | Path, *, trained_by: str = "experiments.train_lm") -> ml_collections.ConfigDict:
    """The config.json a training run wrote into `workdir`; missing or unreadable (not JSON, not an object) is a
    UserError saying which entrypoint (`trained_by`) writes it."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} has no config.json; train first with python -m {trained_by}")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:  # TypeError: JSON that is not an object
        raise UserError(f"{path} is not readable JSON ({error}); valid: the config.json python -m {trained_by} "
                        "writes (restore it, or retrain into a new --workdir)") from None


def load_trained_model(workdir: str | Path, task: TrainTask | None = None, *, mesh: Mesh | None = None
                       ) -> tuple[Any, Any, int]:
    """(model, tokenizer, step) from a workdir's config, tokenizer and latest checkpoint.

    Only the parameters are read (not the optimizer state), each straight into its sharding on `mesh` (default:
    this process's first device, so every process of a multi-host job gets its own copy for inference). `task`
    must build the same module as the run did (its create_model / ffn_factory).
    """
    task = task or TrainTask()
    workdir = Path(workdir)
    config = read_config_json(workdir)
    model_config = model_config_from(config)
    step, meta = latest_meta(workdir / "checkpoints")  # a reader never creates a checkpoint dir in another's run
    if step is None:
        raise UserError(f"{workdir / 'checkpoints'} holds no checkpoint yet")
    check_same_model(meta, model_config, workdir)
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1), jax.local_devices()[:1])

    def create_model() -> nnx.Module:
        if task.create_model is not None:
            return task.create_model(model_config, 0)
        return Transformer(model_config, rngs=nnx.Rngs(0), ffn_factory=task.ffn_factory)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(create_model), nnx.Param)
    target = abstract_with_shardings(abstract_params, param_shardings(mesh, abstract_params))
    checkpointer = Checkpointer(workdir / "checkpoints")
    params = checkpointer.restore_params(step, target)
    checkpointer.close()
    return nnx.merge(graphdef, params), run_tokenizer(config, workdir), step


