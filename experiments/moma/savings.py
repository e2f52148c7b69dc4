"""FLOPs savings η and throughput of each MoMa variant against the dense baseline, from a directory of runs.

    python -m experiments.moma.savings --workdir=DIR [--json] [--throughput_steps=5] [--eta_curves=eval|train]
        [--smooth=5]

DIR holds one run per variant (subdirectories written by experiments.moma.train, one of them `dense`); more dense
runs (other seeds, e.g. `dense_seed1`) get rows of their own, whose η against `dense` is the seed-to-seed noise bar.
η = C_dense_final / C_variant(L_dense_final) (moma.savings), overall and per modality, read by default off the
EVALUATION loss curves in metrics.jsonl (`eval_loss`, `eval_text_loss`, `eval_image_loss`: the same held-out
batches at every evaluation), or with `--eta_curves=train` off the training loss curves (`loss`, `text_loss`,
`image_loss`, the paper's curves) after a trailing mean over `--smooth` logged points. A logged training loss is
one batch's, so at CPU scale its batch-to-batch noise is as large as the differences η measures, and "the first
point at or below dense's final loss" then lands early by chance (a 4t4i run that ended 0.02 above dense read as
η 1.8 off its training curve). C = tokens seen x the variant's analytic training FLOPs per token
(moma.flops.moma_flops_per_token). An upcycled run's C starts at its seed's training compute (stage 1, recorded in
its upcycle_seed.json: experiments.moma.task.upcycled_seed_flops), so its η pays for the 1t1i run it started
from, as the paper's adjusted figures do. η > 1: the variant reaches dense's final loss with less compute; "-" (null
in the JSON): it never does within its run. Throughput: every variant's compiled train step is timed in this process
on the same batches (the dense run's evaluation batches, training-shaped), warmed up first, variants interleaved
round by round so a busy machine slows them alike; the median tokens/s per variant is reported relative to dense.
Writes DIR/SAVINGS.md and DIR/savings.json; `--json` prints the JSON instead of the table: one object per run with
`run`, `variant`, `path`, `flops_per_token`, `seed_training_flops` (0 unless upcycled), `eta`, `eta_text`,
`eta_image`, `final_loss`, `final_text_loss`, `final_image_loss` (smoothed training losses), `eval_loss`,
`eval_text_loss`, `eval_image_loss` (last evaluation), `tokens_per_s` and `throughput_vs_dense` (a fraction, -0.17 =
17% slower); null where a run has no such value or throughput was not measured (--throughput_steps=0).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from absl import flags

from experiments.cli import run

MODALITY_KEYS = {"overall": "loss", "text": "text_loss", "image": "image_loss"}  # modality -> its metrics.jsonl key
# the curves η can be read from: modality -> metrics.jsonl key (training losses, or the periodic evaluation's)
CURVE_KEYS = {"train": MODALITY_KEYS,
              "eval": {"overall": "eval_loss", "text": "eval_text_loss", "image": "eval_image_loss"}}
ETA_KEYS = {"overall": "eta", "text": "eta_text", "image": "eta_image"}  # modality -> its row key
BASELINE = "dense"


def define_flags() -> None:
    """Defined only when this file runs as the entrypoint (the reproduction imports its functions)."""
    flags.DEFINE_string("workdir", None, "Directory holding one MoMa run per variant.", required=True)
    flags.DEFINE_bool("json", False, "Print the results as JSON instead of the markdown table.")
    flags.DEFINE_integer("throughput_steps", 5, "Timed train steps per variant and round (0 = skip).")
    flags.DEFINE_integer("smooth", 5, "Trailing mean over this many logged points of the training curves.")
    flags.DEFINE_enum("eta_curves", "eval", list(CURVE_KEYS), "Read η off the evaluation loss curves (eval: the same "
                      "held-out batches every time) or the smoothed training loss curves (train: one batch a point).")


def main(argv: list[str]) -> None:
    del argv
    from lm_core.errors import UserError

    options = flags.FLAGS
    if options.throughput_steps < 0:
        raise UserError(f"--throughput_steps={options.throughput_steps} is invalid; valid: an integer >= 0 (0 = skip)")
    if options.smooth < 1:
        raise UserError(f"--smooth={options.smooth} is invalid; valid: an integer >= 1 (1 = no smoothing)")
    rows = write_savings(Path(options.workdir), smooth=options.smooth, throughput_steps=options.throughput_steps,
                         eta_curves=options.eta_curves)
    print(json.dumps(rows, indent=2) if options.json else markdown_table(rows))


def write_savings(directory: Path, *, smooth: int = 5, throughput_steps: int = 5, eta_curves: str = "eval"
                  ) -> list[dict[str, Any]]:
    """η (and throughput unless throughput_steps is 0) of every run in `directory`: DIR/savings.json, DIR/SAVINGS.md."""
    rows = savings_rows(directory, smooth=smooth, eta_curves=eta_curves)
    if throughput_steps:
        add_throughput(rows, measure_throughput(find_runs(directory), throughput_steps))
    (directory / "savings.json").write_text(json.dumps(rows, indent=2) + "\n")
    (directory / "SAVINGS.md").write_text("# MoMa: FLOPs savings and throughput vs dense\n\n" + markdown_table(rows)
                                          + "\n")
    return rows


# --- reading runs ---------------------------------------------------------------------------------------------------


def find_runs(directory: Path) -> dict[str, Path]:
    """run name (its directory's name) -> run dir for every MoMa run directly under `directory`, sorted by name
    with the dense baseline first (an upcycled or re-run variant next to the original keeps its own row)."""
    from lm_core.errors import UserError
    from lm_core.run_config import read_config_json

    if not Path(directory).is_dir():
        raise UserError(f"{directory} does not exist or is not a directory; valid: a directory with one "
                        "experiments.moma.train run per variant")
    runs, dense = {}, []
    for path in sorted(p for p in Path(directory).iterdir() if (p / "config.json").is_file()):
        # an unreadable one is refused, not skipped: it may be a run's
        config = read_config_json(path, trained_by="experiments.moma.train")
        if "moma" in config and (path / "metrics.jsonl").exists():  # not e.g. a shared image tokenizer's dir
            runs[path.name] = path
            if config.moma.variant == BASELINE:
                dense.append(path.name)
    # several dense runs (other seeds, for a noise bar): the one named `dense` is the baseline
    baseline = dense[0] if len(dense) == 1 else (BASELINE if BASELINE in dense else None)
    if baseline is None:
        raise UserError(f"{directory} holds {len(dense)} dense MoMa runs {dense} among {sorted(runs) or 'none'}; "
                        "valid: a directory with one experiments.moma.train run per variant, one dense run (or "
                        f"several, one of them named {BASELINE!r}: the baseline; the others measure seed noise)")
    return {baseline: runs.pop(baseline), **runs}


def seed_noise(rows: list[dict[str, Any]], smooth: int = 5, eta_curves: str = "eval") -> dict[str, float] | None:
    """The η noise bar of `savings_rows(...)`'s runs (`noise_from_seeds`) on the curves η is read from; None
    without a second dense run."""
    def curves(row: dict[str, Any]) -> Curves:
        return eta_curves_of(Path(row["path"]), smooth, eta_curves)

    seeds = [curves(row) for row in rows[1:] if row["variant"] == BASELINE]
    return noise_from_seeds(curves(rows[0]), seeds) if seeds else None


Curves = dict[str, tuple[list[float], list[float]]]  # modality -> (training FLOPs, smoothed loss), as loss_curves


def noise_from_seeds(baseline: Curves, seeds: list[Curves]) -> dict[str, float]:
    """Per η key (eta, eta_text, eta_image): the largest η - 1 between the baseline dense run and a dense run of
    another seed, both ways round. The two end at the same compute, so the one that ends lower reaches the other's
    final loss by then: one way round is always defined, and η - 1 >= 0 there."""
    from moma.savings import flops_savings

    noise = {}
    for modality, key in ETA_KEYS.items():
        etas = [eta for other in seeds if modality in other and modality in baseline
                for eta in (flops_savings(*baseline[modality], *other[modality]),
                            flops_savings(*other[modality], *baseline[modality])) if eta is not None]
        noise[key] = max(etas) - 1.0 if etas else 0.0
    return noise


def variant_of(run_dir: Path) -> str:
    return json.loads((run_dir / "config.json").read_text())["moma"]["variant"]


def training_flops_per_token(run_dir: Path) -> float:
    """The run's analytic training FLOPs per token (what its compute axis is measured in)."""
    from experiments.moma import task

    return task.training_flops_per_token(task.read_run_config(run_dir))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """values[i] -> mean of values[max(0, i - window + 1) : i + 1]: a causal smoother (no look-ahead)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def eta_curves_of(run_dir: Path, smooth: int, eta_curves: str) -> Curves:
    """The curves η is read from: the evaluation losses as logged, or the training losses smoothed."""
    return loss_curves(run_dir, smooth if eta_curves == "train" else 1, eta_curves)


def loss_curves(run_dir: Path, smooth: int = 1, curves: str = "train") -> Curves:
    """modality -> (training FLOPs, loss smoothed over `smooth` points) at every logged step that has that loss
    (`curves`: the training losses or the evaluation losses, CURVE_KEYS); the FLOPs include what an upcycled run
    inherited from its seed."""
    from experiments.moma.task import upcycled_seed_flops
    from lm_core.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    per_token, inherited = training_flops_per_token(run_dir), upcycled_seed_flops(run_dir)
    result = {}
    for modality, key in CURVE_KEYS[curves].items():
        points = [(inherited + row["tokens"] * per_token, row[key]) for row in rows
                  if key in row and row.get("tokens")]
        if points:
            result[modality] = ([c for c, _ in points], trailing_mean([loss for _, loss in points], smooth))
    return result


def final_eval(run_dir: Path) -> dict[str, float | None]:
    """The last logged evaluation losses: eval_loss, eval_text_loss, eval_image_loss (None when not logged)."""
    from lm_core.metrics import read_metrics

    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in row]
    last = rows[-1] if rows else {}
    return {f"eval_{key}": last.get(f"eval_{key}") for key in MODALITY_KEYS.values()}


def savings_rows(directory: Path, smooth: int = 5, eta_curves: str = "eval") -> list[dict[str, Any]]:
    """One row per run (the keys of the module docstring, throughput None): η overall/text/image vs dense read off
    the `eta_curves` curves, final smoothed training and last evaluation losses."""
    from experiments.moma.task import upcycled_seed_flops
    from moma.savings import flops_savings

    runs = find_runs(directory)
    training = {name: loss_curves(path, smooth) for name, path in runs.items()}
    curves = training if eta_curves == "train" else {
        name: eta_curves_of(path, smooth, eta_curves) for name, path in runs.items()}
    baseline = next(iter(runs))
    rows = []
    for name, path in runs.items():
        row: dict[str, Any] = {"run": name, "variant": variant_of(path), "path": str(path),
                               "flops_per_token": training_flops_per_token(path),
                               "seed_training_flops": upcycled_seed_flops(path)}
        for modality, key in MODALITY_KEYS.items():
            final = training[name].get(modality)
            row[f"final_{key}"] = None if final is None else final[1][-1]
            curve, dense = curves[name].get(modality), curves[baseline].get(modality)
            if curve is None or dense is None:
                row[ETA_KEYS[modality]] = None
            else:  # the baseline is 1 by definition; off its own noisy curve it could reach its final loss earlier
                row[ETA_KEYS[modality]] = 1.0 if name == baseline else flops_savings(*dense, *curve)
        row.update(final_eval(path))
        row.update(tokens_per_s=None, throughput_vs_dense=None)
        rows.append(row)
    return rows


# --- throughput ---------------------------------------------------------------------------------------------------


def measure_throughput(runs: dict[str, Path], steps: int, rounds: int = 3) -> dict[str, float]:
    """run name -> median tokens/s of its compiled train step on the dense run's evaluation batches.

    Each variant is compiled and run twice (warm-up) first; then `rounds` rounds each time `steps` steps of every
    variant in turn, so load from other processes hits all variants alike."""
    from experiments.moma.task import mixed_eval_batches, moma_task, read_run_config
    from lm_core import distributed, sharding
    from lm_core.train_step import init_train_state, make_train_step

    host_batches = mixed_eval_batches(next(iter(runs.values())))
    steppers: dict[str, Any] = {}
    for name, path in runs.items():
        config = read_run_config(path)
        parts = moma_task(config, path).step(config)
        mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
        graphdef, state, shardings = init_train_state(parts.create_model, parts.optimizer, mesh, 0)
        step = make_train_step(graphdef, parts.loss_fn, parts.optimizer, mesh, shardings)
        batches = [distributed.global_batch(mesh, {k: v for k, v in batch.items() if k != "chars"})
                   for batch in host_batches]
        for batch in batches[:2]:  # compile + warm up
            state, metrics = step(state, batch)
        float(metrics["loss"])
        steppers[name] = [step, state, batches]
    tokens_per_step = host_batches[0]["inputs"].size
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step, state, batches) in steppers.items():
            start = time.perf_counter()
            for index in range(steps):
                state, metrics = step(state, batches[index % len(batches)])
            float(metrics["loss"])  # waits for the last step
            timings[name].append(steps * tokens_per_step / (time.perf_counter() - start))
            steppers[name][1] = state
    return {name: statistics.median(values) for name, values in timings.items()}


def add_throughput(rows: list[dict[str, Any]], tokens_per_s: dict[str, float]) -> None:
    """Adds tokens_per_s and throughput_vs_dense (relative to the first row, the dense run) to each row."""
    baseline = tokens_per_s[rows[0]["run"]]
    for row in rows:
        row["tokens_per_s"] = tokens_per_s[row["run"]]
        row["throughput_vs_dense"] = tokens_per_s[row["run"]] / baseline - 1.0


# --- report -------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """η overall/text/image, final training and evaluation losses and throughput per run."""

    def eta(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def loss(row: dict[str, Any], key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.3f}"

    def losses(row: dict[str, Any], prefix: str) -> str:
        return f"{loss(row, prefix + 'loss')} ({loss(row, prefix + 'text_loss')} / {loss(row, prefix + 'image_loss')})"

    has_throughput = any(row.get("tokens_per_s") is not None for row in rows)
    header = ["run", "η overall", "η text", "η image", "train loss (text / image)", "eval loss (text / image)"]
    header += ["tokens/s", "vs dense"] if has_throughput else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        labels = [row["variant"]] if row["run"] != row["variant"] else []
        labels += ["upcycled, stage 1 counted"] if row.get("seed_training_flops") else []
        name = f"{row['run']} ({', '.join(labels)})" if labels else row["run"]
        cells = [name, *(eta(row.get(key)) for key in ETA_KEYS.values()), losses(row, "final_"),
                 losses(row, "eval_")]
        if has_throughput:
            cells += [f"{row['tokens_per_s']:,.0f}", f"{100 * row['throughput_vs_dense']:+.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    run(main)
