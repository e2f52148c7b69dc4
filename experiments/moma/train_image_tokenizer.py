"""Train the VQ image tokenizer that turns images into the image tokens of MoMa's mixed-modal sequences.

    python -m experiments.moma.train_image_tokenizer --workdir=/tmp/vq --source=builtin --image_size=32 \\
        --codebook_size=256 --steps=400

Expected (builtin glyphs, 32x32 -> 8x8 = 64 codes per image, widths 16,32, batch 32; 2 busy CPU cores: 0.2-0.3 s
per step, ~2-3 min): train MSE from ~0.2 at step 1 to ~0.007 (in [0, 1] pixel units); validation MSE ~0.0075
(PSNR ~21 dB), codebook usage ~99% of 256 codes, perplexity ~145.

Sources: builtin[:<count>] (rendered captioned glyphs, no network), images:<folder> (your PNG/JPEG files;
unreadable ones are skipped and named), tfds:<name>[/<config>] (a prepared TFDS image-caption dataset,
--data_dir). Writes DIR/vq/ (config.json + state.npz, load with moma.vq.load_vq), DIR/reconstructions.png
(rows of validation originals, each followed by its reconstruction), DIR/metrics.jsonl, DIR/config.json and
DIR/REPORT.md. Rerunning with the same flags reuses DIR/vq and only re-evaluates; different model flags on an
existing DIR/vq are refused (use a new --workdir).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from absl import flags

from experiments.cli import run
from lm_core.atomic_files import write_jsonl_atomically

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the tokenizer, plots and report go.", required=True)
_SOURCE = flags.DEFINE_string("source", "builtin", "builtin[:<count>] | images:<folder> | tfds:<name>[/<config>]")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for tfds: sources.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Images are center-cropped and resized to this square.")
_CODEBOOK_SIZE = flags.DEFINE_integer("codebook_size", 256, "K: number of image codes.")
_CODE_DIM = flags.DEFINE_integer("code_dim", 32, "Dimension of each code vector.")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 4, "Image side / code grid side (power of two).")
_WIDTHS = flags.DEFINE_list("widths", ["16", "32"], "Channels per resolution level, log2(downsample) entries.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per step.")
_LR = flags.DEFINE_float("lr", 2e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and code restarts.")
_EVAL_IMAGES = flags.DEFINE_integer("eval_images", 256, "Validation images for the report's numbers.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Print a progress line every this many steps.")


def main(argv: list[str]) -> None:
    del argv
    from lm_core.errors import UserError
    from moma.images import get_image_source

    workdir = Path(_WORKDIR.value)
    config = _vq_config()
    _check_flags(workdir)
    source = get_image_source(_SOURCE.value, image_size=config.image_size, data_dir=_DATA_DIR.value)
    if source.skipped:
        print(f"skipped {len(source.skipped)} unreadable image(s): {', '.join(source.skipped[:10])}")

    from experiments import plots
    from moma import vq

    vq_dir = workdir / "vq"
    history: list[dict[str, float]] = []
    if (vq_dir / vq.CONFIG_FILE).exists():
        saved = vq.load_config(vq_dir)
        if saved != config:
            changed = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(saved).items()
                       if getattr(config, k) != v}
            raise UserError(f"{vq_dir} holds a tokenizer with a different config (saved vs flags: {changed}); "
                            "valid: the same model flags to re-evaluate it, or a new --workdir")
        print(f"{vq_dir} already holds this tokenizer: re-evaluating it (delete it to retrain)")
        model = vq.load_vq(vq_dir)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(_flag_values(), indent=2) + "\n")
        model, history = _train(config, source)
        vq.save_vq(model, vq_dir)
        write_jsonl_atomically(workdir / "metrics.jsonl", history)
    validation = source.split("validation")
    images = plots.stack_images(validation, _EVAL_IMAGES.value)
    result = vq.evaluate(model, images)
    shown = images[:16]
    plots.write_reconstruction_grid(workdir / "reconstructions.png", shown, vq.reconstruct_images(model, shown)[1])
    history = history or _read_jsonl(workdir / "metrics.jsonl")
    (workdir / "REPORT.md").write_text(_report(source.name, config, result, history))
    print(f"validation ({result.num_images} images): MSE {result.mse:.4f} (PSNR {result.psnr:.1f} dB), codebook "
          f"usage {100 * result.usage:.1f}% of {config.codebook_size}, perplexity {result.perplexity:.1f}")
    print(f"tokenizer in {vq_dir}; wrote {workdir / 'reconstructions.png'} and {workdir / 'REPORT.md'}")


def _check_flags(workdir: Path) -> None:
    """The training flags and the workdir, before the image source is read or anything is written."""
    from lm_core.errors import UserError

    for name, value in (("steps", _STEPS.value), ("batch_size", _BATCH_SIZE.value),
                        ("eval_images", _EVAL_IMAGES.value), ("log_every", _LOG_EVERY.value)):
        if value < 1:
            raise UserError(f"--{name}={value} is invalid; valid: a positive integer")
    if not _LR.value > 0:
        raise UserError(f"--lr={_LR.value} is invalid; valid: a positive learning rate")
    if _SEED.value < 0:  # numpy's generators take none, and would fail only after config.json is written
        raise UserError(f"--seed={_SEED.value} is invalid; valid: an integer >= 0")
    blocking = next((path for path in (workdir, *workdir.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--workdir={workdir} cannot be a directory: {blocking} is a file; valid: a new or "
                        "existing directory")


def _vq_config():  # -> moma.vq.VQConfig (imported lazily: --help stays fast)
    from lm_core.errors import UserError
    from moma.vq import VQConfig

    try:
        widths = tuple(int(w) for w in _WIDTHS.value)
    except ValueError as e:
        raise UserError(f"--widths={','.join(_WIDTHS.value)} is invalid; valid: comma-separated positive "
                        "integers, e.g. 16,32") from e
    return VQConfig(image_size=_IMAGE_SIZE.value, downsample=_DOWNSAMPLE.value, codebook_size=_CODEBOOK_SIZE.value,
                    code_dim=_CODE_DIM.value, widths=widths)


def _train(config, source):  # -> (VQTokenizer, history)
    from experiments.moma.image_tokenizer import train_tokenizer

    return train_tokenizer(config, source, steps=_STEPS.value, batch_size=_BATCH_SIZE.value, lr=_LR.value,
                           seed=_SEED.value, log_every=_LOG_EVERY.value)


def _report(source_name: str, config, result, history: list[dict[str, float]]) -> str:
    lines = ["# VQ image tokenizer", "",
             f"Source `{source_name}`, {config.image_size}x{config.image_size} images -> {config.grid_size}x"
             f"{config.grid_size} = {config.tokens_per_image} codes from a codebook of {config.codebook_size} "
             f"(code_dim {config.code_dim}, widths {list(config.widths)}, EMA codebook, beta {config.beta}).", "",
             f"Command: `python -m experiments.moma.train_image_tokenizer {' '.join(_command_flags())}`", "",
             "| metric | value |", "|---|---|",
             f"| validation MSE ([0, 1] pixels, {result.num_images} images) | {result.mse:.4f} |",
             f"| validation PSNR | {result.psnr:.1f} dB |",
             f"| codebook usage (validation) | {100 * result.usage:.1f}% of {config.codebook_size} |",
             f"| code perplexity (validation) | {result.perplexity:.1f} |"]
    if history:
        last = history[-min(10, len(history)):]
        seconds = [row["seconds"] for row in history[1:]] or [history[0]["seconds"]]
        lines += [f"| train MSE, step 1 -> last 10 steps | {history[0]['mse']:.4f} -> "
                  f"{statistics.mean(r['mse'] for r in last):.4f} |",
                  f"| steps | {len(history)} |",
                  f"| median time per step (after compilation) | {statistics.median(seconds):.3f} s |"]
    lines += ["", "![originals (odd rows) and reconstructions (even rows)](reconstructions.png)", ""]
    return "\n".join(lines)


def _flag_values() -> dict:
    return {name: flags.FLAGS[name].value for name in
            ("source", "data_dir", "image_size", "codebook_size", "code_dim", "downsample", "widths", "steps",
             "batch_size", "lr", "seed", "eval_images")}


def _command_flags() -> list[str]:
    values = _flag_values()
    return [f"--workdir={_WORKDIR.value}"] + [
        f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in values.items() if v is not None]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    run(main)
