"""Registered reproduction of Lin et al. 2024 (MoMa) at CPU scale: tokenizer, one run per variant, η, throughput.

`python -m experiments.reproduce --only=moma --scale=demo|tiny|small` runs `run(scale, workdir)`:
1. the VQ image tokenizer (WORKDIR/image_tokenizer, reconstruction grid copied to WORKDIR/vq_reconstructions.png);
2. one experiments.moma.train run per variant in WORKDIR/<variant> (demo: dense and moe_4t4i at demo size;
   tiny/small: dense, moe_1t1i, moe_4t4i, moe_8x and the compute-matched mod_moe_4t4i of moma_tiny.py, and
   dense_seed1, dense with seed 1, whose η against dense is the claims' noise bar);
3. auxiliary routers for every variant that routes (experiments.moma.train_aux_routers, when installed);
4. η overall/text/image vs dense and measured throughput (experiments.moma.savings), loss-curve plots and
   WORKDIR/REPORT.md. Rerunning resumes finished parts (training resumes, tokenizer and aux routers are reused).
"""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path
from typing import Any

from experiments.registry import Section

NAME = "moma"
TITLE = "moma: MoMa, modality-aware mixture of experts (Lin et al. 2024)"
DEMO_VARIANTS = ("dense", "moe_4t4i")
BASELINE = "dense"
NOISE_RUN = "dense_seed1"  # a second dense run, seed 1, at tiny and small scale
AUX_ROUTER_MODULE = "experiments.moma.train_aux_routers"


def scale_configs(scale: str, image_tokenizer_dir: Path) -> dict[str, Any]:
    """variant -> its training config at `scale` (all sharing one image tokenizer dir)."""
    from experiments.configs import moma_tiny

    configs = {}
    runs = DEMO_VARIANTS if scale == "demo" else (*moma_tiny.VARIANTS, NOISE_RUN)
    for run_name in runs:
        variant = BASELINE if run_name == NOISE_RUN else run_name
        config = moma_tiny.get_config("demo" if scale == "demo" else variant)
        config.moma.variant = variant
        if run_name == NOISE_RUN:
            config.seed = 1  # other initial weights and data order: the η noise bar (savings.seed_noise)
        if scale == "small":  # a wider model and longer training for a GPU or a patient CPU
            config.model.update(dict(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, d_ff=768))
            config.data.global_batch_size, config.steps = 32, 2000
            config.eval_every = config.checkpoint_every = 250
            config.moma.image_source = "builtin"
            if variant.startswith("mod_"):  # matched to the 4 layers just set, as moma_tiny matches its own
                config.model.num_layers = moma_tiny.compute_matched_depth(config)
        config.moma.image_tokenizer.dir = str(image_tokenizer_dir)
        configs[run_name] = config
    return configs


def train_variants(configs: dict[str, Any], workdir: Path) -> dict[str, float]:
    """Train (or resume) every variant; -> variant -> wall-clock seconds of this call."""
    from experiments.moma.task import moma_task
    from lm_core.trainer import train_to_end

    seconds = {}
    for index, (variant, config) in enumerate(configs.items(), 1):
        print(f"[moma {index}/{len(configs)}] training {variant} ({config.steps} steps)", flush=True)
        start = time.monotonic()
        run_dir = workdir / variant
        train_to_end(config, run_dir, moma_task(config, run_dir))  # a signal stops the reproduction here
        seconds[variant] = time.monotonic() - start
    return seconds


def train_aux_routers(configs: dict[str, Any], workdir: Path, steps: int) -> dict[str, dict[str, float]] | str:
    """variant -> aux-router results for each variant that routes, or a note when the module is missing."""
    try:
        module = importlib.import_module(AUX_ROUTER_MODULE)
    except ImportError as error:
        return f"not run: {AUX_ROUTER_MODULE} is not available ({error})"
    results = {}
    for run_name, config in configs.items():
        if config.moma.variant in ("dense", "moe_1t1i"):
            continue  # nothing is routed batch-wide
        print(f"[moma] auxiliary routers for {run_name}", flush=True)
        results[run_name] = module.run(module.AuxRouterConfig(steps=steps), workdir / run_name)
    return results


def plot_loss_curves(workdir: Path, variants: list[str]) -> list[str]:
    """One PNG per modality: evaluation loss (the curves η is read off) vs training FLOPs, a line per variant."""
    from experiments.moma.savings import MODALITY_KEYS, loss_curves
    from experiments.plots import line_plot

    curves = {variant: loss_curves(workdir / variant, curves="eval") for variant in variants}
    names = []
    for modality in MODALITY_KEYS:
        series = {variant: curve[modality] for variant, curve in curves.items() if modality in curve}
        name = f"loss_{modality}.png"
        line_plot(workdir / name, series, title=f"MoMa evaluation loss ({modality})", xlabel="training FLOPs",
                  ylabel="loss (nats/token)", logx=True)
        names.append(name)
    return names


def routed_fraction_table(workdir: Path, runs: list[str], window: int = 5) -> list[str]:
    """Per routed expert group of each run: the share of its tokens that got any expert in the first logged
    training step and over the last `window` logged steps (expert choice drops the rest from that layer's FFN)."""
    from lm_core.metrics import read_metrics

    lines = ["| run | expert group | tokens routed, first step | tokens routed, last steps |", "|---|---|---|---|"]
    for run in runs:
        rows = read_metrics(workdir / run / "metrics.jsonl")
        keys = sorted({key for row in rows for key in row if key.endswith("_routed_fraction")})
        for key in keys:
            values = [row[key] for row in rows if key in row]
            last = values[-window:]
            lines.append(f"| {run} | {key.removesuffix('_routed_fraction')} | {values[0]:.3f} | "
                         f"{sum(last) / len(last):.3f} |")
    return lines if len(lines) > 2 else ["No run routes its tokens by expert choice."]


def aux_router_table(results: dict[str, dict[str, float]] | str) -> list[str]:
    if isinstance(results, str):
        return [results]
    lines = ["| variant | aux-router accuracy | recall | eval loss, expert choice | eval loss, causal aux routing |",
             "|---|---|---|---|---|"]
    for variant, r in results.items():
        lines.append(f"| {variant} | {r['aux_router_accuracy']:.3f} | {r['aux_router_recall']:.3f} | "
                     f"{r['noncausal_loss']:.3f} | {r['causal_loss']:.3f} |")
    return lines


def claim_verdicts(scale: str, dense: Any, rows: list[dict[str, Any]], aux: dict[str, dict[str, float]] | str,
                   smooth: int) -> list[str]:
    """One line per paper claim (against a second dense seed's η when there is one: savings.seed_noise), or at
    demo scale one line saying it cannot show η."""
    from experiments.moma.claims import claim_lines, too_small_line
    from experiments.moma.savings import seed_noise

    if scale == "demo":
        return [too_small_line(dense.steps, dense.model.d_model)]
    return claim_lines(rows, seed_noise(rows, smooth), aux)


def non_embedding_params(config: Any) -> int:
    """Attention, FFN and norm parameters of a dense model of `config` (lm_core.flops.param_counts)."""
    from lm_core.flops import param_counts
    from lm_core.run_config import model_config_from

    counts = param_counts(model_config_from(config))
    return counts.attention + counts.ffn + counts.norms


def write_report(workdir: Path, scale: str, configs: dict[str, Any], rows: list[dict[str, Any]],
                 seconds: dict[str, float], plots: list[str], aux: dict[str, dict[str, float]] | str,
                 verdicts: list[str]) -> Path:
    from experiments.moma.savings import markdown_table

    dense = configs["dense"]
    lines = [f"# {TITLE}", "",
             f"Scale `{scale}`: d_model {dense.model.d_model}, {dense.model.num_layers} layers (MoD variants deeper, "
             f"compute-matched), vocabulary {dense.model.vocab_size} (text + {dense.moma.image_tokenizer.codebook_size}"
             f" image codes + BOI/EOI), {dense.steps} steps of {dense.data.global_batch_size} x {dense.data.seq_len} "
             f"tokens, image source `{dense.moma.image_source}` at {dense.moma.image_tokenizer.image_size}px.", "",
             "## FLOPs savings η and throughput vs dense", "",
             "η = C_dense_final / C_variant(L_dense_final) from the evaluation loss curves (the same held-out "
             f"batches every {dense.eval_every} steps; \"-\": the variant never reaches dense's final loss). "
             "Throughput: compiled train steps timed side by side in one process on the same batches.", "",
             markdown_table(rows), "",
             *(verdicts if scale == "demo" else ["### Claims", "", *(f"- {line}" for line in verdicts)]), "",
             "Paper (1.4B, 1T tokens): 4t4i 3.7x overall (text 2.6x, image 5.2x), 8x 3.0x, 4t4i + MoD 4.2x; "
             "throughput 8x -9%, 1t1i -6%, 4t4i -17%, MoD 4t4i -31%. Here the dense model has "
             f"{non_embedding_params(dense):,} non-embedding parameters and trains for {dense.steps:,} steps: "
             "expect much smaller or no savings; the CPU executes every static expert slot "
             "(moma.max_*_fraction: 1.2x the active expert FLOPs with moma_tiny's bounds, 2x at 1.0), which costs "
             "throughput the paper's GPU system did not pay.", "",
             "Training time (this call, 2 CPU cores shared with other jobs; the first run includes training the "
             "image tokenizer and quantising the images): "
             + ", ".join(f"{variant} {seconds[variant] / 60:.1f} min" for variant in seconds), "",
             "## Routed tokens", "",
             "Averaged over layers (`<group>_routed_fraction` in metrics.jsonl): a token no expert chose gets no FFN "
             "in that layer.", "", *routed_fraction_table(workdir, list(configs)), "",
             "## Loss curves", ""]
    lines += [f"![{name}]({name})" for name in plots]
    lines += ["", "## Auxiliary routers (causal inference)", "", *aux_router_table(aux), "",
              "## Image tokenizer", "", "Validation originals (odd rows) and reconstructions (even rows):", "",
              "![reconstructions](vq_reconstructions.png)", ""]
    path = workdir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def run(scale: str, workdir: Path) -> Section:
    from experiments.moma.savings import write_savings

    workdir = Path(workdir)
    configs = scale_configs(scale, workdir / "image_tokenizer")
    seconds = train_variants(configs, workdir)
    aux = train_aux_routers(configs, workdir, steps=40 if scale == "demo" else 200)
    smooth = 2 if scale == "demo" else 5
    rows = write_savings(workdir, smooth=smooth, throughput_steps=3 if scale == "demo" else 5)
    plots = plot_loss_curves(workdir, list(configs))
    shutil.copyfile(workdir / "image_tokenizer" / "reconstructions.png", workdir / "vq_reconstructions.png")
    verdicts = claim_verdicts(scale, configs["dense"], rows, aux, smooth)
    report = write_report(workdir, scale, configs, rows, seconds, plots, aux, verdicts)

    def eta(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    measured = "; ".join(f"{row['run']}: η {eta(row['eta'])} (text {eta(row['eta_text'])}, image "
                         f"{eta(row['eta_image'])}), throughput {100 * row['throughput_vs_dense']:+.0f}%"
                         for row in rows[1:])
    return Section(TITLE, report, f"{' '.join(verdicts)} Measured: {measured}. Loss curves in `moma/loss_*.png`.")
