"""Accelerator-scale numbers in one run: 1B dense train-step MFU per attention kernel, MoMa vs dense, KVP TTFT.

    python -m benchmarks.accelerator [--json] [--batch=8] [--remat=dots_with_no_batch_dims_saveable]
        [--steps=5] [--budget_s=480]

Needs a GPU or TPU: on a CPU backend it prints one line and exits 2 before building anything (the CPU-sized
benchmarks are benchmarks.train_step, benchmarks.moe and benchmarks.ttft). Everything runs on all local devices
through lm_core's real code paths, with random weights and random token ids:

1. dense_1b: the bf16 AdamW train step (lm_core.train_step on a data-parallel mesh, MeshConfig(data=-1)) of a
   ~1B-parameter Llama-style model: 16 layers, d_model 2048, 16 heads x 128, d_ff 5632, V=32000 untied, seq 2048,
   `--batch` rows per device, scan_layers, `--remat`, output layer + loss in chunks of 4096 tokens
   (next_token_loss's chunk_tokens), bf16 compute on f32 master weights. Once per attention kernel the backend
   has (GPU: xla_blocked, dot_product = cuDNN; TPU: also splash). MFU = lm_core.flops training FLOPs per token x
   tokens/s / the published bf16 peak of all devices (lm_core.flops.total_peak_flops_per_s).
   Memory per device: params + grads + Adam moments in f32 = 16 B/param = 15 GB, the scan's stacked copy of the
   weights (4 GB), the saved activations (~11 GB at batch 8 with dots_with_no_batch_dims_saveable) and one
   layer's recomputed attention (<= 5 GB): ~35-40 GB, within an 80 GB H100 (141 GB H200).
2. moma_4t4i_vs_dense: MoMa's moe_4t4i against its dense variant at the same width (8 layers, d_model 1024,
   seq 2048, remat full), model, loss and FLOPs from experiments.moma.task's moma_task (build_moma_model,
   mixed_modal_loss; config experiments/configs/moma_tiny.py with these sizes, a codebook of 8192; no data files:
   random ids, 75% image codes in every row, moma_tiny's measured mix and the slot bounds set for it).
3. kvp_ttft_2048: time to first token of a 2048-token prompt, batch 1: the 1B base alone vs KV prediction with
   the canonical auxiliary c1024x8 (experiments.kv_prediction.evaluation.measure_ttft, bf16 weights), with the
   FLOPs reduction it promises next to the measured one, as benchmarks/ttft.py prints them.

Each timing is 2 warm-up steps (the first compiles) and the median of `--steps`. The whole run keeps to an
8-minute budget (`--budget_s`): a part that would not fit in what is left is skipped and named under "skipped";
a part that fails (out of memory, a kernel the backend lacks) is reported as {"error": ...} and the rest runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.common import ArgumentParser, emit, median_seconds, peak_memory_bytes, positive_int
from benchmarks.ttft import family
from experiments.cli import fail
from experiments.kv_prediction.evaluation import measure_ttft
from lm_core import flops, optim
from lm_core import train_step as ts
from lm_core.config import REMAT_POLICIES, ModelConfig
from lm_core.loss import next_token_loss
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, make_mesh

BUDGET_S = 480.0  # 8 minutes for the whole run
CPU_ERROR = ("benchmarks.accelerator needs a GPU or TPU; this machine's JAX backend is cpu "
             "(use benchmarks.train_step on a CPU)")
ATTENTION_IMPLS = {"gpu": ("xla_blocked", "dot_product"), "tpu": ("xla_blocked", "splash", "dot_product")}
MOMA_VARIANT = "moe_4t4i"
# Seconds a part needs at least (compile + warm-up + timed steps at the default sizes, with margin): one is not
# started with less left, and later attention kernels leave room for MoMa and KVP.
NEEDED_S = {"dense": 90.0, "moma": 150.0, "kvp": 75.0}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What is measured; `default_sizes` is the accelerator run, tests pass tiny ones."""

    dense: ModelConfig  # the ~1B train-step model (its attention_impl is set per kernel)
    moma: ModelConfig  # the MoMa / dense pair's width and depth
    seq: int = 2048
    per_device_batch: int = 8
    moma_per_device_batch: int = 8
    loss_chunk_tokens: int = 4096
    codebook_size: int = 8192  # image codes in the MoMa vocabulary (Chameleon's VQ codebook size)
    kvp_prompt_len: int = 2048
    kvp_spec: str = "c1024x8"
    warmup: int = 2  # untimed steps, the first of which compiles
    steps: int = 5  # timed steps (median)


def default_sizes(per_device_batch: int = 8, remat: str = "dots_with_no_batch_dims_saveable",
                  steps: int = 5) -> Sizes:
    dense = ModelConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, head_dim=128, d_ff=5632,
                        max_seq_len=2048, tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
                        remat=remat, scan_layers=True)
    moma = ModelConfig(vocab_size=32000, d_model=1024, num_layers=8, num_heads=8, head_dim=128, max_seq_len=2048,
                       tie_embeddings=False, qk_norm=True, dtype="bfloat16", param_dtype="float32", remat="full")
    return Sizes(dense, moma, per_device_batch=per_device_batch, moma_per_device_batch=per_device_batch,
                 steps=steps)


@dataclasses.dataclass
class Budget:
    """Wall-clock budget of the run; `allows` records what had to be skipped."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, part: str, needed: float) -> bool:
        left = self.seconds - self.elapsed()
        if left >= needed:
            return True
        self.skipped.append(f"{part}: {left:.0f} s of the {self.seconds:.0f} s budget left, needs ~{needed:.0f} s")
        return False


def attempt(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`measure()`, or {"error": ...} when it raises (out of memory, an unsupported kernel): one failed part must
    not cost the other parts their share of a scarce accelerator run."""
    try:
        return measure()
    except Exception as error:  # reported in the output; the other parts still run
        lines = str(error).strip().splitlines()
        return {"error": f"{type(error).__name__}: {lines[0][:300] if lines else ''}"}


def token_batch(batch: int, seq: int, vocab: int, image_range: tuple[int, int] | None = None,
                image_fraction: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Random next-token batch [batch, seq] (one document per row, every target counted). With `image_range`,
    round(image_fraction·(seq + 1)) ids of every row are image codes from [lo, hi) at random places, the rest text
    ids below lo (moma.mixed_modal's layout: modality is read off the id)."""
    rng = np.random.default_rng(seed)
    width = seq + 1
    if image_range is None:
        tokens = rng.integers(0, vocab, (batch, width))
    else:
        lo, hi = image_range
        is_image = np.stack([rng.permutation(width) < round(image_fraction * width) for _ in range(batch)])
        tokens = np.where(is_image, rng.integers(lo, hi, (batch, width)), rng.integers(0, lo, (batch, width)))
    tokens = tokens.astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


def time_train_step(create_model: Callable[[], nnx.Module], loss_fn: ts.LossFn, batch: dict[str, np.ndarray],
                    warmup: int, steps: int) -> dict[str, float]:
    """Compile time, median step time and tokens/s of lm_core's AdamW train step on a data-parallel mesh over
    every device (`batch` is the global batch)."""
    mesh = make_mesh(MeshConfig(data=-1))
    optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0))
    graphdef, state, shardings = ts.init_train_state(create_model, optimizer, mesh, seed=0)
    step = ts.make_train_step(graphdef, loss_fn, optimizer, mesh, shardings)
    data = jax.device_put(batch, ts.batch_shardings(mesh, batch))
    holder: dict[str, Any] = {"state": state}  # the step donates its state: each call gets the previous output
    del state

    def one_step() -> Any:
        holder["state"], metrics = step(holder["state"], data)
        holder["metrics"] = metrics
        return metrics

    start = time.perf_counter()
    jax.block_until_ready(one_step())
    compile_s = time.perf_counter() - start
    step_s = median_seconds(one_step, repeats=steps, warmup=max(0, warmup - 1))
    tokens = batch["inputs"].size
    metrics = {name: float(value) for name, value in holder["metrics"].items() if np.ndim(value) == 0}
    return {"tokens_per_s": tokens / step_s, "step_s": step_s, "compile_s": compile_s, "global_batch":
            batch["inputs"].shape[0], "seq": batch["inputs"].shape[1], "loss": metrics["loss"],
            **{name: metrics[name] for name in ("slot_overflow",) if name in metrics}}


def measure_dense(config: ModelConfig, per_device_batch: int, seq: int, loss_chunk_tokens: int, peak: float,
                  warmup: int = 2, steps: int = 5) -> dict[str, float]:
    """Train-step tokens/s and MFU of `Transformer(config)` with the chunked next-token loss."""
    batch = token_batch(per_device_batch * jax.device_count(), seq, config.vocab_size)
    loss_fn = functools.partial(next_token_loss, chunk_tokens=loss_chunk_tokens)
    result = time_train_step(lambda: Transformer(config, rngs=nnx.Rngs(0)), loss_fn, batch, warmup, steps)
    flops_per_token = flops.flops_per_token(config, seq).training
    return {**result, "mfu": flops.mfu(result["tokens_per_s"], flops_per_token, peak),
            "flops_per_token": flops_per_token, "params": flops.param_counts(config).total}


def moma_run_config(model_config: ModelConfig, variant: str, seq: int, codebook_size: int,
                    loss_chunk_tokens: int) -> Any:
    """The ml_collections config experiments.moma.train would run: moma_tiny's variant (its slot bounds and
    image share), with these model sizes, codebook and loss chunking."""
    from experiments.configs import moma_tiny

    config = moma_tiny.get_config(variant)
    config.model.update(model_config.to_dict())
    config.data.seq_len = seq
    config.loss_chunk_tokens = loss_chunk_tokens
    config.moma.image_tokenizer.codebook_size = codebook_size
    return config


def measure_moma_variant(model_config: ModelConfig, variant: str, per_device_batch: int, seq: int,
                         codebook_size: int, loss_chunk_tokens: int, peak: float, warmup: int = 2,
                         steps: int = 5) -> dict[str, Any]:
    """Train-step tokens/s of one MoMa variant: the model, loss and FLOPs of experiments.moma.task's moma_task
    (without its data: the vocabulary layout comes from the config, the batch is random ids)."""
    from experiments.moma.task import mixed_vocab_for, moma_config_from, moma_task
    from lm_core.run_config import model_config_from

    config = moma_run_config(model_config, variant, seq, codebook_size, loss_chunk_tokens)
    parts = moma_task(config, workdir="", check_data=False).step(config)
    moma, vocab, model = moma_config_from(config), mixed_vocab_for(config), model_config_from(config)
    batch = token_batch(per_device_batch * jax.device_count(), seq, model.vocab_size, vocab.image_token_range,
                        config.moma.image_fraction)
    result = time_train_step(parts.create_model, parts.loss_fn, batch, warmup, steps)
    flops_per_token = parts.training_flops_per_token
    return {**result, "mfu": flops.mfu(result["tokens_per_s"], flops_per_token, peak),
            "flops_per_token": flops_per_token, "image_fraction": config.moma.image_fraction,
            "max_text_fraction": moma.max_text_fraction, "max_image_fraction": moma.max_image_fraction}


def measure_kvp_ttft(base: ModelConfig, spec: str, prompt_len: int, repeats: int) -> dict[str, Any]:
    """measure_ttft (batch 1, random weights) of the base alone and KVP with auxiliary `spec`."""
    models = family(base, spec)
    result = measure_ttft(models, prompt_len, batch=1, repeats=repeats)
    return {**result, "base_params": flops.param_counts(base).total,
            "aux_params": flops.param_counts(models.aux.config).total}


def kvp_base_config(dense: ModelConfig, prompt_len: int) -> ModelConfig:
    """The dense model for serving: bf16 weights, no remat or scan, room for the prompt and a few new tokens."""
    return dense.replace(max_seq_len=max(dense.max_seq_len, prompt_len + 64), param_dtype="bfloat16",
                         remat="none", scan_layers=False, attention_impl="auto")


def run_dense(sizes: Sizes, impls: tuple[str, ...], peak: float, budget: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for index, impl in enumerate(impls):
        # later kernels leave room for the MoMa and KVP parts; the first always runs if it fits at all
        needed = NEEDED_S["dense"] + (NEEDED_S["moma"] + NEEDED_S["kvp"] if index else 0.0)
        if not budget.allows(f"dense_1b/{impl}", needed):
            continue
        config = sizes.dense.replace(attention_impl=impl)
        results[impl] = attempt(lambda config=config: measure_dense(
            config, sizes.per_device_batch, sizes.seq, sizes.loss_chunk_tokens, peak, sizes.warmup, sizes.steps))
    return results


def run_moma(sizes: Sizes, peak: float, budget: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for variant in ("dense", MOMA_VARIANT):
        if not budget.allows(f"moma/{variant}", NEEDED_S["moma"] / 2):
            continue
        results[variant] = attempt(lambda variant=variant: measure_moma_variant(
            sizes.moma, variant, sizes.moma_per_device_batch, sizes.seq, sizes.codebook_size, sizes.loss_chunk_tokens,
            peak, sizes.warmup, sizes.steps))
    rates = [results.get(name, {}).get("tokens_per_s") for name in ("dense", MOMA_VARIANT)]
    if all(rates):
        results["tokens_per_s_ratio"] = rates[1] / rates[0]  # MoMa / dense; the paper's GPU system: 0.83
    return results


def run_all(sizes: Sizes, impls: tuple[str, ...], peak: float, budget: Budget) -> dict[str, Any]:
    """Every part within the budget; the JSON report minus the device fields."""
    result: dict[str, Any] = {"dense_1b": run_dense(sizes, impls, peak, budget)}
    result["moma_4t4i_vs_dense"] = run_moma(sizes, peak, budget)
    key = f"kvp_ttft_{sizes.kvp_prompt_len}"
    if budget.allows(key, NEEDED_S["kvp"]):
        base = kvp_base_config(sizes.dense, sizes.kvp_prompt_len)
        result[key] = attempt(lambda: measure_kvp_ttft(base, sizes.kvp_spec, sizes.kvp_prompt_len, sizes.steps))
    result["sizes"] = {"dense": sizes.dense.to_dict(), "moma": sizes.moma.to_dict(), "seq": sizes.seq,
                       "per_device_batch": sizes.per_device_batch, "loss_chunk_tokens": sizes.loss_chunk_tokens,
                       "moma_per_device_batch": sizes.moma_per_device_batch, "codebook_size": sizes.codebook_size,
                       "kvp_spec": sizes.kvp_spec, "warmup": sizes.warmup, "steps": sizes.steps}
    result["elapsed_s"] = budget.elapsed()
    result["skipped"] = budget.skipped
    return result


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def report_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines of `main`'s result."""
    lines = [f"{result['backend']}: {result['num_devices']} x {result['device_kind']}, peak "
             f"{result['peak_flops_per_s'] / 1e12:.0f} TFLOP/s in all ({result['peak_source']})"]
    for impl, r in result["dense_1b"].items():
        lines.append(f"dense 1B ({r['params'] / 1e9:.2f}B params) {impl:>12}: {r['tokens_per_s']:,.0f} tokens/s, "
                     f"step {_ms(r['step_s'])}, MFU {100 * r['mfu']:.1f}%, compile {r['compile_s']:.0f} s"
                     if "error" not in r else f"dense 1B {impl:>12}: {r['error']}")
    moma = result["sizes"]["moma"]
    for name, r in result["moma_4t4i_vs_dense"].items():
        label = f"MoMa {moma['num_layers']}x{moma['d_model']} {name:>8}"
        if isinstance(r, dict):
            lines.append(f"{label}: {r['tokens_per_s']:,.0f} tokens/s, step {_ms(r['step_s'])}, MFU "
                         f"{100 * r['mfu']:.1f}%" if "error" not in r else f"{label}: {r['error']}")
    if "tokens_per_s_ratio" in result["moma_4t4i_vs_dense"]:
        lines.append(f"MoMa {MOMA_VARIANT} / dense tokens/s: {result['moma_4t4i_vs_dense']['tokens_per_s_ratio']:.2f}")
    for key in [k for k in result if k.startswith("kvp_ttft_")]:
        r = result[key]
        lines.append(f"KVP TTFT ({key[9:]} tokens): base {_ms(r['base_ttft_s'])}, KVP {r['variant']} "
                     f"{_ms(r['kvp_ttft_s'])}, aux alone {_ms(r['aux_ttft_s'])} | FLOPs reduction "
                     f"{r['flops_reduction']:.2f}x, measured {r['measured_reduction']:.2f}x -> "
                     f"{r['measured_over_flops']:.2f} of it" if "error" not in r else f"KVP TTFT: {r['error']}")
    lines += [f"skipped {note}" for note in result["skipped"]]
    lines.append(f"elapsed {result['elapsed_s']:.0f} s, peak memory {result['peak_memory_bytes'] / 2**30:.1f} GiB")
    return lines


def backend() -> str:
    """The JAX backend the run measures ("cpu", "gpu", "tpu"); tests replace it to run the parts on a CPU."""
    return jax.default_backend()


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", type=positive_int, default=8, help="rows of 2048 tokens per device")
    parser.add_argument("--remat", default="dots_with_no_batch_dims_saveable", choices=REMAT_POLICIES,
                        help="the dense 1B model's remat policy")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S)
    args = parser.parse_args()
    platform = backend()
    if platform == "cpu":
        fail(CPU_ERROR)
    if args.batch < 1 or args.steps < 1:
        fail(f"--batch={args.batch} and --steps={args.steps} must be positive")
    budget = Budget(args.budget_s)
    peak, peak_source = flops.total_peak_flops_per_s()
    impls = ATTENTION_IMPLS.get(platform, ("xla_blocked", "dot_product"))
    result: dict[str, Any] = {"backend": platform, "device_kind": jax.devices()[0].device_kind,
                              "num_devices": jax.device_count(), "peak_flops_per_s": peak,
                              "peak_source": peak_source, "budget_s": args.budget_s, "jax_version": jax.__version__}
    result.update(run_all(default_sizes(args.batch, args.remat, args.steps), impls, peak, budget))
    result["peak_memory_bytes"] = peak_memory_bytes()
    emit(result, args.json, report_lines(result))


if __name__ == "__main__":
    main()
