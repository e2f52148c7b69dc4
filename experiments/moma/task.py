"""A MoMa run as lm_core's trainer sees it: `moma_task(config, workdir)`, the TrainTask of one variant (its model,
mixed-modal loss and FLOPs, image-caption data, per-modality evaluation, upcycling), and what other modules read
of a MoMa run: `load_moma(workdir)` (trained model + config), `mixed_eval_batches(workdir)`,
`training_flops_per_token(config)`, `upcycled_seed_flops(workdir)` (the compute it inherited from its seed).

The entrypoint `python -m experiments.moma.train` is a thin shell around `moma_task`; savings, auxiliary-router
training, the reproduction and the benchmarks import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

from experiments import plots
from experiments.moma.image_tokenizer import train_tokenizer
from lm_core import tokenizer as tok
from lm_core.checkpoint import Checkpointer, latest_meta
from lm_core.config import ModelConfig
from lm_core.data.image_sources import Captions, ImageCaptionSource
from lm_core.distributed import place_like
from lm_core.errors import UserError
from lm_core.run_config import from_section, model_config_from, read_config_json
from lm_core.run_data import TrainData, tokenizer_cache_dir
from lm_core.sharding import MeshConfig
from lm_core.task import Evaluation, ModelBuilder, StepParts, TrainTask, lm_step_parts
from lm_core.tokenizer import ByteTokenizer
from lm_core.train_step import TrainState
from lm_core.trained_runs import load_trained_model, run_state
from moma import vq
from moma.depths import build_moma_model
from moma.flops import moma_flops_per_token
from moma.images import get_image_source
from moma.losses import mixed_modal_loss, per_modality_eval_row, per_modality_eval_sums
from moma.mixed_modal import (
    CodedPairs,
    MixedModalLoader,
    MixedVocab,
    encode_pairs,
    iter_mixed_eval_batches,
    reserved_ids_for_images,
)
from moma.upcycle import check_upcycle, upcycle_params
from moma.variants import MoMaConfig, check_fits_mesh, check_fits_model, check_routing_capacity, parse_variant
from moma.vq import VQConfig

# moma.image_tokenizer holds these beside the VQConfig fields: where the tokenizer lives and how it is trained.
VQ_TRAINING_KEYS = ("dir", "steps", "batch_size", "learning_rate", "seed")
UPCYCLE_SEED_FILE = "upcycle_seed.json"  # in an upcycled run's workdir: its seed's training compute (seed_record)


# --- configuration ----------------------------------------------------------------------------------------------


def read_run_config(workdir: str | Path) -> ConfigDict:
    """The config.json a MoMa run wrote (a UserError when `workdir` holds no MoMa run)."""
    config = read_config_json(workdir, trained_by="experiments.moma.train")
    if "moma" not in config:
        raise UserError(f"{workdir} holds no MoMa run (its config.json has no moma section)")
    return config


def mixed_vocab_for(config: ConfigDict) -> MixedVocab:
    """Where text, image codes and BOI/EOI live: the top `codebook_size + 2` ids of the text tokenizer's vocabulary.

    Known before any tokenizer is trained, so the model (its image-token range) can be validated first."""
    codebook_size = config.moma.image_tokenizer.codebook_size
    reserved = reserved_ids_for_images(codebook_size)
    if config.data.tokenizer == "byte":
        return MixedVocab.for_tokenizer(ByteTokenizer(num_reserved_ids=reserved), codebook_size)
    return MixedVocab(config.model.vocab_size - reserved, codebook_size, config.model.vocab_size)


def moma_config_from(config: ConfigDict) -> MoMaConfig:
    """The run's MoMaConfig (UserError for an unknown variant, capacity_factor <= 0, ...).

    An upcycled run trains with router noise, as the paper's upcycling does."""
    section = config.moma
    return parse_variant(section.variant, image_token_range=mixed_vocab_for(config).image_token_range,
                         capacity_factor=section.capacity_factor, mod_capacity=section.mod_capacity,
                         max_text_fraction=section.max_text_fraction, max_image_fraction=section.max_image_fraction,
                         routing_groups=section.get("routing_groups", 0), router_noise=bool(section.upcycle_from))


def training_flops_per_token(config: ConfigDict) -> float:
    """The run's analytic training FLOPs per token (moma.flops: what its compute axis and MFU are measured in)."""
    return moma_flops_per_token(model_config_from(config), moma_config_from(config), config.data.seq_len,
                                config.moma.image_fraction).training


def seed_record(seed_dir: str | Path) -> dict[str, Any]:
    """The compute an upcycled run inherits: its seed's training FLOPs up to the seed's latest checkpoint (the one
    upcycling loads), counted as lm_core.trainer counts tokens (steps x batch x seq_len), plus whatever the seed
    itself inherited."""
    seed_dir = Path(seed_dir)
    config = read_run_config(seed_dir)
    step, _ = latest_meta(seed_dir / "checkpoints")
    if step is None:
        raise UserError(f"cannot read the upcycling seed's compute: {seed_dir} holds no checkpoint")
    tokens = step * config.data.global_batch_size * config.data.seq_len
    per_token = training_flops_per_token(config)
    return {"seed_dir": str(seed_dir), "seed_variant": config.moma.variant, "seed_step": step,
            "seed_tokens": tokens, "seed_flops_per_token": per_token,
            "seed_training_flops": upcycled_seed_flops(seed_dir) + tokens * per_token}


def upcycled_seed_flops(workdir: str | Path) -> float:
    """Training FLOPs a run inherited from the seed it was upcycled from; 0 for a run trained from scratch.

    Read from the UPCYCLE_SEED_FILE written when the run was upcycled; for a run upcycled before that file existed,
    computed from the seed's workdir now (the same unless the seed trained on after the upcycling)."""
    config = read_run_config(workdir)
    if not config.moma.get("upcycle_from"):
        return 0.0
    record = Path(workdir) / UPCYCLE_SEED_FILE
    if record.exists():
        return float(json.loads(record.read_text())["seed_training_flops"])
    if not Path(config.moma.upcycle_from).is_dir():
        raise UserError(f"{workdir} was upcycled from {config.moma.upcycle_from}, which is gone, and holds no "
                        f"{UPCYCLE_SEED_FILE}: its seed's compute is unknown")
    return seed_record(config.moma.upcycle_from)["seed_training_flops"]


def vq_config_from(config: ConfigDict) -> VQConfig:
    """The run's image tokenizer: every VQConfig field moma.image_tokenizer sets (a typo is refused)."""
    return from_section(VQConfig, config.moma.image_tokenizer, "moma.image_tokenizer", other_keys=VQ_TRAINING_KEYS)


def image_tokenizer_dir(config: ConfigDict) -> Path:
    """moma.image_tokenizer.dir, or a cache dir named by everything that determines the tokenizer (so every
    variant of a sweep quantises its images with the same codes, trained once)."""
    settings = config.moma.image_tokenizer
    if settings.dir:
        return Path(settings.dir)
    identity = {k: v for k, v in settings.to_dict().items() if k != "dir"}
    identity.update(image_source=config.moma.image_source, data_dir=config.data.data_dir)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return tokenizer_cache_dir().parent / "image_tokenizers" / digest


def image_source(config: ConfigDict) -> ImageCaptionSource:
    """The image-caption source (UserError for an unknown spec or a folder without a readable image)."""
    source = get_image_source(config.moma.image_source, image_size=config.moma.image_tokenizer.image_size,
                              data_dir=config.data.data_dir or None)
    if source.skipped:
        print(f"skipped {len(source.skipped)} unreadable image(s): {', '.join(source.skipped[:10])}", flush=True)
    return source


def _check_image_tokenizer(config: ConfigDict) -> None:
    """An existing tokenizer dir must hold the configured tokenizer (checked before anything is written)."""
    directory = image_tokenizer_dir(config)
    if (directory / vq.CONFIG_FILE).exists() and vq.load_config(directory) != vq_config_from(config):
        raise UserError(f"{directory} holds an image tokenizer with another config ({vq.load_config(directory)}); "
                        "valid: the same moma.image_tokenizer settings, or another moma.image_tokenizer.dir")


def _check_upcycle_source(config: ConfigDict, target: MoMaConfig) -> None:
    """upcycle_from must be a finished-enough moe_1t1i run of the same model (checked before anything is written);
    every refusal names the field, since the messages underneath name only a directory or a variant."""
    source_dir = Path(config.moma.upcycle_from)
    prefix = f"cannot upcycle from moma.upcycle_from={source_dir}"
    try:
        source_config = read_run_config(source_dir)
        check_upcycle(moma_config_from(source_config), target)
    except UserError as error:
        raise UserError(f"{prefix}: {error}") from None
    if source_config.model.to_dict() != config.model.to_dict():
        raise UserError(f"{prefix}: its model config differs from this run's model.*")
    if latest_meta(source_dir / "checkpoints")[0] is None:  # probed without creating a directory in the seed
        raise UserError(f"{prefix}: it holds no checkpoint yet")


def upcycled_built_on(config: ConfigDict) -> dict[str, str | None]:
    """{seed dir: its state (lm_core.trained_runs.run_state)}: what an upcycled run is built on, saved with its
    checkpoints (TrainTask.meta["built_on"]) and compared on every rerun, so once the seed has trained on
    (or been replaced) the upcycled run is refused, naming both states, rather than resumed or taken as finished
    on weights and a data position its seed no longer has."""
    seed_dir = Path(config.moma.upcycle_from)
    return {str(seed_dir): run_state(seed_dir)}


def _check_image_tokenizer_training(config: ConfigDict) -> None:
    """The VQ training settings, named by their fields (the VQ trainer would name them without the prefix, and
    only after the image source is read; numpy takes no negative seed)."""
    settings = config.moma.image_tokenizer
    for name, low in (("steps", 1), ("batch_size", 1), ("seed", 0)):
        if not isinstance(settings[name], int) or settings[name] < low:
            raise UserError(f"moma.image_tokenizer.{name}={settings[name]!r} is invalid; valid: an integer >= {low}")
    if not settings.learning_rate > 0:
        raise UserError(f"moma.image_tokenizer.learning_rate={settings.learning_rate!r} is invalid; valid: a "
                        "positive learning rate")


# --- data -------------------------------------------------------------------------------------------------------


def ensure_image_tokenizer(config: ConfigDict, source: ImageCaptionSource) -> vq.VQTokenizer:
    """The run's VQ tokenizer: loaded from its dir, or trained there first (with a reconstruction grid)."""
    directory = image_tokenizer_dir(config)
    if (directory / vq.CONFIG_FILE).exists():
        return vq.load_vq(directory)
    settings = config.moma.image_tokenizer
    print(f"training the VQ image tokenizer into {directory} ({settings.steps} steps)", flush=True)
    model, history = train_tokenizer(vq_config_from(config), source, steps=settings.steps,
                                     batch_size=settings.batch_size, lr=settings.learning_rate, seed=settings.seed,
                                     log_every=max(1, settings.steps // 4))
    vq.save_vq(model, directory)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    shown = plots.stack_images(source.split("validation"), 16)
    plots.write_reconstruction_grid(directory / "reconstructions.png", shown, vq.reconstruct_images(model, shown)[1])
    return model


def coded_pairs(config: ConfigDict, split: str, source: ImageCaptionSource, vq_model: vq.VQTokenizer | None = None
                ) -> CodedPairs:
    """`split` of the image source quantised by the run's VQ tokenizer, cached in the tokenizer's dir."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", config.moma.image_source).strip("_")
    path = image_tokenizer_dir(config) / "pairs" / f"{name}-{split}.npz"
    if path.exists():
        return CodedPairs.load(path)
    pairs = encode_pairs(vq_model or vq.load_vq(image_tokenizer_dir(config)), source.split(split))
    pairs.save(path)
    return pairs


def text_tokenizer(config: ConfigDict, workdir: Path, source: ImageCaptionSource) -> tok.Tokenizer | ByteTokenizer:
    """The caption tokenizer with the image codes + BOI/EOI as reserved ids: the run's saved copy, the upcycling
    source's, or trained on the training captions (cached)."""
    reserved = reserved_ids_for_images(config.moma.image_tokenizer.codebook_size)
    if config.data.tokenizer == "byte":
        return tok.ByteTokenizer(num_reserved_ids=reserved)
    for saved in (workdir / "tokenizer.model", Path(config.moma.upcycle_from or workdir) / "tokenizer.model"):
        if saved.exists():
            return tok.Tokenizer.load(saved)
    captions = Captions(source.split("train"))
    spec = tok.TokenizerSpec(vocab_size=config.model.vocab_size, seed=config.data.tokenizer_seed,
                             num_reserved_ids=reserved)
    return tok.train_tokenizer((captions[i] for i in range(len(captions))), spec, cache_dir=tokenizer_cache_dir())


def make_mixed_data(config: ConfigDict, workdir: Path, model_config: ModelConfig, source: ImageCaptionSource
                    ) -> TrainData:
    """TrainTask.make_data: the VQ tokenizer, coded pairs, caption tokenizer, mixed-modal loader and eval batches."""
    vq_model = ensure_image_tokenizer(config, source)
    train_pairs = coded_pairs(config, "train", source, vq_model)
    validation_pairs = coded_pairs(config, "validation", source, vq_model)
    tokenizer = text_tokenizer(config, workdir, source)
    vocab = MixedVocab.for_tokenizer(tokenizer, config.moma.image_tokenizer.codebook_size)
    loader = MixedModalLoader(train_pairs, tokenizer, vocab, seq_len=config.data.seq_len,
                              global_batch_size=config.data.global_batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    if config.moma.upcycle_from:  # continue the source run's stream (a resumed run restores its own position later)
        checkpoints = Checkpointer(Path(config.moma.upcycle_from) / "checkpoints")
        loader.restore(checkpoints.read_data(checkpoints.latest_step()))
        checkpoints.close()
    eval_batches = list(iter_mixed_eval_batches(validation_pairs, tokenizer, vocab, config.data.seq_len,
                                                config.data.global_batch_size, config.eval_batches))
    return TrainData(tokenizer, loader, eval_batches)


def mixed_eval_batches(workdir: str | Path, max_batches: int | None = None, batch_size: int | None = None
                       ) -> list[dict[str, Any]]:
    """The evaluation batches of a trained MoMa run (its validation pairs, tokenizer and sizes), as numpy dicts
    with inputs/targets/segment_ids/positions/loss_mask [batch, seq] and chars [batch]."""
    workdir = Path(workdir)
    config = read_run_config(workdir)
    pairs = coded_pairs(config, "validation", image_source(config))
    tokenizer = tok.load_tokenizer(workdir / "tokenizer.model")
    vocab = MixedVocab.for_tokenizer(tokenizer, config.moma.image_tokenizer.codebook_size)
    return list(iter_mixed_eval_batches(pairs, tokenizer, vocab, config.data.seq_len,
                                        batch_size or config.data.global_batch_size,
                                        max_batches or config.eval_batches))


# --- the task -----------------------------------------------------------------------------------------------------


def moma_task(config: ConfigDict, workdir: str | Path, check_data: bool = True, num_devices: int | None = None
              ) -> TrainTask:
    """The TrainTask of a MoMa run (lm_core.task.TrainTask). Validates everything a user can get wrong before
    anything is written.

    Relative moma.image_tokenizer.dir / moma.upcycle_from are made absolute in `config`, so the config.json the
    trainer writes names them wherever it is read from. check_data=False skips opening the image source and the
    upcycling run (no built_on: experiments.compile_check compiles the step without data; make_data opens them).
    num_devices: the devices the mesh will span (default: this process's jax.device_count())."""
    for field, parent in (("dir", config.moma.image_tokenizer), ("upcycle_from", config.moma)):
        if parent[field]:
            parent[field] = str(Path(parent[field]).absolute())
    moma = moma_config_from(config)
    model_config = model_config_from(config)
    _check_fits(config, moma, model_config, num_devices or jax.device_count())
    vq_config_from(config)
    _check_image_tokenizer_training(config)
    source, meta = None, {"moma": {k: v for k, v in dataclasses.asdict(moma).items() if k != "router_noise"}}
    if check_data:
        _check_image_tokenizer(config)
        source = image_source(config)
        if config.moma.upcycle_from:
            _check_upcycle_source(config, moma)
            meta["built_on"] = upcycled_built_on(config)
    vocab = mixed_vocab_for(config)
    loss_fn = functools.partial(mixed_modal_loss, vocab=vocab, z_loss_weight=config.z_loss,
                                chunk_tokens=config.loss_chunk_tokens)
    flops = training_flops_per_token(config)

    def initialize_upcycled(state: TrainState) -> TrainState:  # the 1t1i weights, every expert a copy
        seed = seed_record(config.moma.upcycle_from)  # the seed's latest checkpoint, the one load_moma reads
        source_model, _ = load_moma(config.moma.upcycle_from)
        params = upcycle_params(nnx.state(source_model, nnx.Param), state.params)
        if jax.process_index() == 0:  # on the fresh state only (a resumed run keeps its record)
            Path(workdir).mkdir(parents=True, exist_ok=True)
            (Path(workdir) / UPCYCLE_SEED_FILE).write_text(json.dumps(seed, indent=2) + "\n")
        # each process places its own shards (a device_put across processes would be a cross-host transfer)
        return state._replace(params=place_like(state.params, params))

    def step(run_config: ConfigDict) -> StepParts:  # MoMa's module, mixed-modal loss and FLOPs
        return dataclasses.replace(lm_step_parts(run_config, moma_builder(moma)), loss_fn=loss_fn,
                                   training_flops_per_token=flops)

    return TrainTask(
        step=step,
        evaluation=Evaluation(per_modality_eval_sums(vocab), row=per_modality_eval_row),
        make_data=lambda config, workdir, model_config: make_mixed_data(config, workdir, model_config,
                                                                        source or image_source(config)),
        initialize=initialize_upcycled if config.moma.upcycle_from else None,
        meta=meta,
    )


def moma_builder(moma: MoMaConfig) -> ModelBuilder:
    """How a MoMa run's module is built (training and loading share it)."""
    return lambda model_config, seed: build_moma_model(model_config, moma, rngs=nnx.Rngs(seed))


def _check_fits(config: ConfigDict, moma: MoMaConfig, model_config: ModelConfig, num_devices: int) -> None:
    """The variant against the mesh (expert axis, routing groups with at least one slot each) and the model."""
    check_fits_mesh(moma, config.mesh.expert)
    check_fits_model(moma, model_config)
    shards = MeshConfig(**config.mesh.to_dict()).batch_shards(num_devices)
    rows_per_step = config.data.global_batch_size // max(1, config.grad_accum_steps)  # a microbatch is routed
    check_routing_capacity(moma, rows_per_step, config.data.seq_len, shards)


def load_moma(workdir: str | Path) -> tuple[nnx.Module, ConfigDict]:
    """A trained MoMa model (latest checkpoint, one device) and the ConfigDict it was trained with."""
    config = read_run_config(workdir)
    model, _, _ = load_trained_model(workdir, moma_builder(moma_config_from(config)))
    return model, config
