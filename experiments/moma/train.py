"""Train one MoMa variant (dense, moe_1t1i, moe_4t4i, moe_8x, mod_moe_4t4i, ...) on mixed-modal image-caption data.

    python -m experiments.moma.train --config=experiments/configs/moma_tiny.py:moe_4t4i --workdir=DIR \\
        [--config.moma.image_tokenizer.dir=SHARED_DIR] [--config.<field>=...]

The config has train_lm's fields (`steps`, `mesh.*`, `model.*`, `data.seq_len`, `data.global_batch_size`,
`data.tokenizer`, `optimizer.*`, ...) plus `moma.*` (variant, capacity_factor, image_source, image_tokenizer.*,
upcycle_from, routing_groups; see experiments/configs/moma_tiny.py). Experts are sharded over the mesh axis
`expert` (`--config.mesh.expert=4` needs expert groups divisible by 4); each device routes its own batch shard and
sends the chosen tokens to the experts by all-to-all (`moma.routing_groups` = 0, moma/dispatch.py), and
`--config.moma.routing_groups=K` fixes K groups of rows on any mesh (1: the paper's whole-batch choice).

What it does: trains the VQ image tokenizer first if `moma.image_tokenizer.dir` holds none (the default dir is a
cache keyed by its settings), quantises the image source once (cached next to the tokenizer), trains a text
tokenizer on the captions whose reserved ids hold the image codes and BOI/EOI, and runs lm_core's training loop
with the MoMa model and a loss that logs text and image losses (`text_loss`, `image_loss`, `eval_text_loss`,
`eval_image_loss` in DIR/metrics.jsonl). DIR gets config.json, metrics.jsonl, tensorboard/, tokenizer.model and
checkpoints/; rerunning resumes exactly, SIGTERM/Ctrl-C saves and exits.
`--config.moma.upcycle_from=<a moe_1t1i DIR>` starts an m-t-n-i variant from that run's weights (every expert a copy
of its modality's FFN, every router column a copy of its gate: moma.upcycle; router noise on), with a fresh
learning-rate schedule, continuing that run's data stream where it stopped. The seed's training compute up to the
checkpoint it was upcycled from is recorded in DIR/upcycle_seed.json (`seed_record`), where experiments.moma.savings
starts the upcycled run's compute axis, so its η pays for stage 1 as the paper's does. The seed's state (its latest
step and loss) is saved with the upcycled run's checkpoints (`upcycled_built_on`): once the seed has trained on, a
rerun of the upcycled run is refused in one line naming both states (move the stale run away to redo it).

For other modules: `moma_task(config, workdir)` (the TrainTask), `load_moma(workdir)` (trained model + config),
`mixed_eval_batches(workdir)` (the run's mixed-modal evaluation batches), `training_flops_per_token(config)` and
`upcycled_seed_flops(workdir)` (the compute a run inherited from its upcycling seed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "moma_tiny.py")
UPCYCLE_SEED_FILE = "upcycle_seed.json"  # in an upcycled run's workdir: its seed's training compute (seed_record)


def define_flags() -> None:
    """Flags are defined only when this file runs as the entrypoint: other modules import its functions."""
    define_config_file("config", DEFAULT_CONFIG, "MoMa training config file (ml_collections).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from lm_core.trainer import train, validate_run_config

    config, workdir = flags.FLAGS.config, Path(flags.FLAGS.workdir)
    validate_run_config(config)  # before the MoMa checks, which would trip over e.g. a batch of 0 rows first
    result = train(config, workdir, moma_task(config, workdir))
    if result.stopped_by_signal:
        sys.exit(143)
    row = result.last_metrics
    print(f"done: {config.moma.variant} step {result.step}, loss {row.get('loss', float('nan')):.4f} (text "
          f"{row.get('text_loss', float('nan')):.4f}, image {row.get('image_loss', float('nan')):.4f}), "
          f"workdir {result.workdir}")


# --- configuration ----------------------------------------------------------------------------------------------


def read_run_config(workdir: str | Path):  # -> ml_collections.ConfigDict
    """The config.json a MoMa run wrote (a UserError when `workdir` holds no MoMa run)."""
    from lm_core.errors import UserError
    from lm_core.trainer import read_config_json

    config = read_config_json(workdir, trained_by="experiments.moma.train")
    if "moma" not in config:
        raise UserError(f"{workdir} holds no MoMa run (its config.json has no moma section)")
    return config


def mixed_vocab_for(config):  # -> moma.mixed_modal.MixedVocab
    """Where text, image codes and BOI/EOI live: the top `codebook_size + 2` ids of the text tokenizer's vocabulary.

    Known before any tokenizer is trained, so the model (its image-token range) can be validated first."""
    from lm_core.tokenizer import ByteTokenizer
    from moma.mixed_modal import MixedVocab, reserved_ids_for_images

    codebook_size = config.moma.image_tokenizer.codebook_size
    reserved = reserved_ids_for_images(codebook_size)
    if config.data.tokenizer == "byte":
        return MixedVocab.for_tokenizer(ByteTokenizer(num_reserved_ids=reserved), codebook_size)
    return MixedVocab(config.model.vocab_size - reserved, codebook_size, config.model.vocab_size)


def moma_config_from(config):  # -> moma.variants.MoMaConfig
    """The run's MoMaConfig (UserError for an unknown variant, capacity_factor <= 0, ...).

    An upcycled run trains with router noise, as the paper's upcycling does."""
    from moma.variants import parse_variant

    section = config.moma
    return parse_variant(section.variant, image_token_range=mixed_vocab_for(config).image_token_range,
                         capacity_factor=section.capacity_factor, mod_capacity=section.mod_capacity,
                         max_text_fraction=section.max_text_fraction, max_image_fraction=section.max_image_fraction,
                         routing_groups=section.get("routing_groups", 0), router_noise=bool(section.upcycle_from))


def training_flops_per_token(config) -> float:
    """The run's analytic training FLOPs per token (moma.flops: what its compute axis and MFU are measured in)."""
    from lm_core.trainer import model_config_from
    from moma.flops import moma_flops_per_token

    return moma_flops_per_token(model_config_from(config), moma_config_from(config), config.data.seq_len,
                                config.moma.image_fraction).training


def seed_record(seed_dir: str | Path) -> dict[str, Any]:
    """The compute an upcycled run inherits: its seed's training FLOPs up to the seed's latest checkpoint (the one
    upcycling loads), counted as lm_core.trainer counts tokens (steps x batch x seq_len), plus whatever the seed
    itself inherited."""
    from lm_core.checkpoint import latest_meta
    from lm_core.errors import UserError

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
    from lm_core.errors import UserError

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


def vq_config_from(config):  # -> moma.vq.VQConfig
    from moma.vq import VQConfig

    settings = config.moma.image_tokenizer
    return VQConfig(image_size=settings.image_size, downsample=settings.downsample,
                    codebook_size=settings.codebook_size, code_dim=settings.code_dim, widths=tuple(settings.widths))


def image_tokenizer_dir(config) -> Path:
    """moma.image_tokenizer.dir, or a cache dir named by everything that determines the tokenizer (so every
    variant of a sweep quantises its images with the same codes, trained once)."""
    from lm_core.trainer import tokenizer_cache_dir

    settings = config.moma.image_tokenizer
    if settings.dir:
        return Path(settings.dir)
    identity = {k: v for k, v in settings.to_dict().items() if k != "dir"}
    identity.update(image_source=config.moma.image_source, data_dir=config.data.data_dir)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return tokenizer_cache_dir().parent / "image_tokenizers" / digest


def image_source(config):  # -> moma.images.ImageCaptionSource
    """The image-caption source (UserError for an unknown spec or a folder without a readable image)."""
    from moma.images import get_image_source

    source = get_image_source(config.moma.image_source, image_size=config.moma.image_tokenizer.image_size,
                              data_dir=config.data.data_dir or None)
    if source.skipped:
        print(f"skipped {len(source.skipped)} unreadable image(s): {', '.join(source.skipped[:10])}", flush=True)
    return source


def _check_image_tokenizer(config) -> None:
    """An existing tokenizer dir must hold the configured tokenizer (checked before anything is written)."""
    from lm_core.errors import UserError
    from moma import vq

    directory = image_tokenizer_dir(config)
    if (directory / vq.CONFIG_FILE).exists() and vq.load_config(directory) != vq_config_from(config):
        raise UserError(f"{directory} holds an image tokenizer with another config ({vq.load_config(directory)}); "
                        "valid: the same moma.image_tokenizer settings, or another moma.image_tokenizer.dir")


def _check_upcycle_source(config, target) -> None:
    """upcycle_from must be a finished-enough moe_1t1i run of the same model (checked before anything is written);
    every refusal names the field, since the messages underneath name only a directory or a variant."""
    from lm_core.checkpoint import latest_meta
    from lm_core.errors import UserError
    from moma.upcycle import check_upcycle

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


def upcycled_built_on(config) -> dict[str, str | None]:
    """{seed dir: its state (lm_core.trainer.run_state)}: what an upcycled run is built on, saved with its
    checkpoints (TrainTask.extra_meta["built_on"]) and compared on every rerun, so once the seed has trained on
    (or been replaced) the upcycled run is refused, naming both states, rather than resumed or taken as finished
    on weights and a data position its seed no longer has."""
    from lm_core.trainer import run_state

    seed_dir = Path(config.moma.upcycle_from)
    return {str(seed_dir): run_state(seed_dir)}


def _check_image_tokenizer_training(config) -> None:
    """The VQ training settings, named by their fields (the VQ trainer would name them without the prefix, and
    only after the image source is read; numpy takes no negative seed)."""
    from lm_core.errors import UserError

    settings = config.moma.image_tokenizer
    for name, low in (("steps", 1), ("batch_size", 1), ("seed", 0)):
        if not isinstance(settings[name], int) or settings[name] < low:
            raise UserError(f"moma.image_tokenizer.{name}={settings[name]!r} is invalid; valid: an integer >= {low}")
    if not settings.learning_rate > 0:
        raise UserError(f"moma.image_tokenizer.learning_rate={settings.learning_rate!r} is invalid; valid: a "
                        "positive learning rate")


# --- data -------------------------------------------------------------------------------------------------------


def ensure_image_tokenizer(config, source):  # -> moma.vq.VQTokenizer
    """The run's VQ tokenizer: loaded from its dir, or trained there first (with a reconstruction grid)."""
    from experiments.moma.image_tokenizer import train_tokenizer
    from moma import vq

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
    shown = vq.stack_images(source.split("validation"), 16)
    vq.write_reconstruction_grid(directory / "reconstructions.png", shown, vq.reconstruct_images(model, shown)[1])
    return model


def coded_pairs(config, split: str, source, vq_model=None):  # -> moma.mixed_modal.CodedPairs
    """`split` of the image source quantised by the run's VQ tokenizer, cached in the tokenizer's dir."""
    from moma import vq
    from moma.mixed_modal import CodedPairs, encode_pairs

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", config.moma.image_source).strip("_")
    path = image_tokenizer_dir(config) / "pairs" / f"{name}-{split}.npz"
    if path.exists():
        return CodedPairs.load(path)
    pairs = encode_pairs(vq_model or vq.load_vq(image_tokenizer_dir(config)), source.split(split))
    pairs.save(path)
    return pairs


def text_tokenizer(config, workdir: Path, source):  # -> lm_core.tokenizer.Tokenizer | ByteTokenizer
    """The caption tokenizer with the image codes + BOI/EOI as reserved ids: the run's saved copy, the upcycling
    source's, or trained on the training captions (cached)."""
    from lm_core import tokenizer as tok
    from lm_core.data.image_sources import Captions
    from lm_core.trainer import tokenizer_cache_dir
    from moma.mixed_modal import reserved_ids_for_images

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


def make_mixed_data(config, workdir: Path, model_config, source):  # -> lm_core.trainer.TrainData
    """TrainTask.make_data: the VQ tokenizer, coded pairs, caption tokenizer, mixed-modal loader and eval batches."""
    import jax

    from lm_core.checkpoint import Checkpointer
    from lm_core.trainer import TrainData
    from moma.mixed_modal import MixedModalLoader, MixedVocab, iter_mixed_eval_batches

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
    from lm_core import tokenizer as tok
    from moma.mixed_modal import MixedVocab, iter_mixed_eval_batches

    workdir = Path(workdir)
    config = read_run_config(workdir)
    pairs = coded_pairs(config, "validation", image_source(config))
    tokenizer = tok.load_tokenizer(workdir / "tokenizer.model")
    vocab = MixedVocab.for_tokenizer(tokenizer, config.moma.image_tokenizer.codebook_size)
    return list(iter_mixed_eval_batches(pairs, tokenizer, vocab, config.data.seq_len,
                                        batch_size or config.data.global_batch_size,
                                        max_batches or config.eval_batches))


# --- the task -----------------------------------------------------------------------------------------------------


def moma_task(config, workdir: str | Path, check_data: bool = True, num_devices: int | None = None):
    """The TrainTask of a MoMa run (lm_core.trainer.TrainTask). Validates everything a user can get wrong before
    anything is written.

    Relative moma.image_tokenizer.dir / moma.upcycle_from are made absolute in `config`, so the config.json the
    trainer writes names them wherever it is read from. check_data=False skips opening the image source and the
    upcycling run (no built_on: experiments.compile_check compiles the step without data; make_data opens them).
    num_devices: the devices the mesh will span (default: this process's jax.device_count())."""
    import jax
    from flax import nnx

    from lm_core.trainer import TrainTask, model_config_from
    from moma.depths import build_moma_model
    from moma.experts import with_router_noise
    from moma.losses import mixed_modal_loss, per_modality_eval_row, per_modality_eval_sums

    for field, parent in (("dir", config.moma.image_tokenizer), ("upcycle_from", config.moma)):
        if parent[field]:
            parent[field] = str(Path(parent[field]).absolute())
    moma = moma_config_from(config)
    model_config = model_config_from(config)
    _check_fits(config, moma, model_config, num_devices or jax.device_count())
    vq_config_from(config)
    _check_image_tokenizer_training(config)
    source, extra_meta = None, {"moma": {k: v for k, v in dataclasses.asdict(moma).items() if k != "router_noise"}}
    if check_data:
        _check_image_tokenizer(config)
        source = image_source(config)
        if config.moma.upcycle_from:
            _check_upcycle_source(config, moma)
            extra_meta["built_on"] = upcycled_built_on(config)
    vocab = mixed_vocab_for(config)
    loss_fn = functools.partial(mixed_modal_loss, vocab=vocab, z_loss_weight=config.z_loss,
                                chunk_tokens=config.loss_chunk_tokens)

    def initialize_upcycled(state):  # TrainState -> TrainState: the 1t1i weights, every expert a copy
        from lm_core.distributed import place_like
        from moma.upcycle import upcycle_params

        seed = seed_record(config.moma.upcycle_from)  # the seed's latest checkpoint, the one load_moma reads
        source_model, _ = load_moma(config.moma.upcycle_from)
        params = upcycle_params(nnx.state(source_model, nnx.Param), state.params)
        if jax.process_index() == 0:  # on the fresh state only (a resumed run keeps its record)
            Path(workdir).mkdir(parents=True, exist_ok=True)
            (Path(workdir) / UPCYCLE_SEED_FILE).write_text(json.dumps(seed, indent=2) + "\n")
        # each process places its own shards (a device_put across processes would be a cross-host transfer)
        return state._replace(params=place_like(state.params, params))

    return TrainTask(
        loss_fn=with_router_noise(loss_fn) if moma.router_noise else loss_fn,
        create_model=lambda model_config, seed: build_moma_model(model_config, moma, rngs=nnx.Rngs(seed)),
        eval_sums_fn=per_modality_eval_sums(vocab),
        initialize=initialize_upcycled if config.moma.upcycle_from else None,
        training_flops_per_token=training_flops_per_token(config),
        extra_meta=extra_meta,
        make_data=lambda config, workdir, model_config: make_mixed_data(config, workdir, model_config,
                                                                        source or image_source(config)),
        eval_row_fn=per_modality_eval_row,
    )


def _check_fits(config, moma, model_config, num_devices: int) -> None:
    """The variant against the mesh (expert axis, routing groups with at least one slot each) and the model."""
    from lm_core.sharding import MeshConfig
    from moma.variants import check_fits_mesh, check_fits_model, check_routing_capacity

    check_fits_mesh(moma, config.mesh.expert)
    check_fits_model(moma, model_config)
    shards = MeshConfig(**config.mesh.to_dict()).batch_shards(num_devices)
    rows_per_step = config.data.global_batch_size // max(1, config.grad_accum_steps)  # a microbatch is routed
    check_routing_capacity(moma, rows_per_step, config.data.seq_len, shards)


def load_moma(workdir: str | Path):  # -> (lm_core.model.Transformer, ml_collections.ConfigDict)
    """A trained MoMa model (latest checkpoint, one device) and the ConfigDict it was trained with."""
    from flax import nnx

    from lm_core.trainer import TrainTask, load_trained_model
    from moma.depths import build_moma_model

    config = read_run_config(workdir)
    moma = moma_config_from(config)
    task = TrainTask(create_model=lambda model_config, seed: build_moma_model(model_config, moma,
                                                                             rngs=nnx.Rngs(seed)))
    model, _, _ = load_trained_model(workdir, task)
    return model, config


if __name__ == "__main__":
    define_flags()
    run(main)
