"""Data throughput of one host: text tokenised on the fly vs a prepared dataset, against what a train step consumes.

    python -m benchmarks.data [--json] [--config=experiments/configs/vocab_sweep_small.py[:variant]]
        [--source=builtin] [--tokenizer=byte|WORKDIR] [--vocab_size=V] [--seq_len=S] [--batch_size=B]
        [--prepared=DIR] [--compression=none|zstd|snappy] [--loader_threads=-1] [--device=h100] [--mfu=0.4]
        [--batches=N] [--warmup=2] [--repeats=3]

Three rates, in tokens/s of this process (one host packing a global batch of --batch_size rows):
- on the fly: an `LMDataLoader` on its first pass over the source's train split, so every batch pays for the
  tokenisation of its documents (a fresh single-pass loader per measurement: its cache never helps);
- prepared: the grain pipeline training on `tokens:DIR` reads through (`GrainPackedLoader`, data.loader=grain) over
  the same source and tokenizer, prepared once into a temporary directory with --compression (or --prepared=DIR,
  written by experiments.prepare_data); the preparation is timed apart (`prepare_seconds`). Its prefetch threads
  are what training picks (`prepared_threads`; data.loader_threads=-1: none on a CPU backend, 2 elsewhere) or
  --loader_threads; with other than 2, `prepared_threads2` times it with 2 as well, for comparison.
  `prepared_stream` is the same data through `PreparedTokensLoader` (data.loader=stream);
- required: what a train step of --config's model consumes on ONE --device at --mfu: peak x mfu / training FLOPs
  per token (lm_core.flops) at the config's seq_len. A sweep config's model is its smallest group (fewest
  non-vocabulary parameters) at its smallest vocabulary: the fastest-stepping model, the hardest to feed.
Targets: prepared >= 20x on the fly, and prepared >= required (a host feeding k devices needs k x required).

The tokenizer: `byte`, a run's workdir or tokenizer file, else a sentencepiece BPE of --vocab_size trained on the
source exactly as the trainer trains it (and cached with its tokenizers). --vocab_size, --seq_len and --batch_size
default to the config's model and data. Each rate is the median over --repeats fresh loaders of --batches batches
(default: as many as take ~2 s, or the whole first pass when it is shorter) after --warmup batches of another
loader. A rate counts the tokens the loss reads (loss_mask), so a single pass's padded last batch is not inflated.
The text loader tokenises 256 documents at a time, so a run of only a few --batches pays for documents it never
delivers and understates the on-the-fly rate; a whole first pass pays for exactly what it delivers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.common import ArgumentParser, emit, nonnegative_int, positive_int, unit_fraction
from lm_core import flops
from lm_core.config import ModelConfig
from lm_core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "vocab_sweep_small.py"
TARGET_SECONDS = 2.0  # a measurement without --batches runs this long
TARGET_VS_ON_THE_FLY = 20.0
TARGET_VS_REQUIRED = 1.0

Batch = dict[str, np.ndarray]


class LoadedConfig(NamedTuple):
    spec: str  # as given, for the report
    config: Any  # ml_collections.ConfigDict


def config_file(spec: str) -> LoadedConfig:
    """An argparse type: `path[:variant]` loaded as the entrypoints load --config (ml_collections' parser)."""
    from ml_collections.config_flags import config_flags

    from experiments.cli import one_line

    try:
        config = config_flags.ConfigFileFlagParser("config").parse(spec)
        config.keys  # noqa: B018 - a file that failed to load is a stand-in that raises on first use
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, AttributeError) as error:
        raise argparse.ArgumentTypeError(one_line(error)) from None
    return LoadedConfig(spec, config)


def peak_device(text: str) -> str:
    """An argparse type: a device of lm_core.flops' peak table (TPUs also without their 'tpu ' prefix: v5p)."""
    name = " ".join(text.lower().split())
    for key in (name, f"tpu {name}"):
        if key in flops.DEVICE_PEAK_FLOPS:
            return key
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: {', '.join(flops.DEVICE_PEAK_FLOPS)}")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", type=config_file, default=str(DEFAULT_CONFIG), help="path[:variant]")
    parser.add_argument("--source", default=None, help="text source (default: builtin, or --prepared's)")
    parser.add_argument("--data_dir", default="", help="where TFDS-backed sources are read ('' = their default)")
    parser.add_argument("--tokenizer", default="", help="byte, a run's workdir or a tokenizer file (default: BPE)")
    parser.add_argument("--vocab_size", type=positive_int, default=None, help="the default BPE's vocabulary")
    parser.add_argument("--seq_len", type=positive_int, default=None)
    parser.add_argument("--batch_size", type=positive_int, default=None, help="rows of each batch")
    parser.add_argument("--prepared", default="", help="a prepared dataset DIR to read instead of preparing one")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes preparing the dataset")
    parser.add_argument("--loader_threads", type=int, default=-1,
                        help="grain prefetch threads of the prepared loader (data.loader_threads; -1: as training "
                             "picks them, 0 on a CPU backend, else 2)")
    parser.add_argument("--compression", choices=("none", "zstd", "snappy"), default="none",
                        help="how the prepared records are stored (experiments.prepare_data --compression)")
    parser.add_argument("--device", type=peak_device, default="h100")
    parser.add_argument("--mfu", type=unit_fraction, default=0.4)
    parser.add_argument("--batches", type=positive_int, default=None, help=f"default: ~{TARGET_SECONDS:g} s worth")
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    return parser


def parse_args(parser: ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.vocab_size is not None and (args.tokenizer or args.prepared):
        parser.error("--vocab_size sizes the default BPE only; valid: leave it out with --tokenizer or --prepared")
    if args.loader_threads < -1:
        parser.error(f"--loader_threads={args.loader_threads} is invalid; valid: an integer >= 0, or -1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# What a train step consumes


def benchmark_model(config: Any) -> tuple[str, ModelConfig]:
    """(name, model) whose train step the data must feed: a sweep's smallest group at its smallest vocabulary,
    since that model steps fastest; any other config's own model."""
    from lm_core.run_config import model_config_from

    if "sweep" not in config:
        model = model_config_from(config)
        return f"d{model.d_model}L{model.num_layers} V={model.vocab_size}", model
    from experiments.vocab_scaling.runner import parse_groups

    group = min(parse_groups(config.sweep.groups), key=lambda g: g.non_vocab_params())
    vocab_size = min(int(v) for v in config.sweep.vocab_sizes)
    return f"{group.name} V={vocab_size}", group.model_config(vocab_size, config.data.seq_len)


def required_rate(model: ModelConfig, seq_len: int, device: str, mfu: float) -> dict[str, float]:
    peak = flops.DEVICE_PEAK_FLOPS[device]
    per_token = flops.flops_per_token(model, seq_len).training
    return {"required_tokens_per_s": peak * mfu / per_token, "peak_flops_per_s": peak,
            "training_flops_per_token": per_token}


# ---------------------------------------------------------------------------------------------------------------
# The data


@dataclasses.dataclass(frozen=True)
class Data:
    """The text both loaders read and the tokenizer they share."""

    source: str
    data_dir: str
    texts: Sequence[str]  # the source's train split
    tokenizer: Any
    tokenizer_name: str  # how the report names it
    tokenizer_spec: str  # what `prepare` is given: byte or a path


def source_name(args: argparse.Namespace, dataset: Any) -> str:
    """--source, else the prepared dataset's, else builtin; one that contradicts --prepared's is refused."""
    if dataset is None:
        return args.source or "builtin"
    if args.source and args.source != dataset.manifest["source"]:
        raise UserError(f"--prepared={args.prepared} holds source '{dataset.manifest['source']}', not "
                        f"--source={args.source}; valid: the same source, or no --source")
    return dataset.manifest["source"]


def open_data(args: argparse.Namespace, vocab_size: int, tokenizer_seed: int, scratch: Path, dataset: Any) -> Data:
    from experiments.registry import register_text_sources
    from lm_core import tokenizer as tok
    from lm_core.data import get_text_source
    from lm_core.data.prepared import load_source_tokenizer
    from lm_core.run_data import tokenizer_cache_dir

    register_text_sources()  # the papers' prefixes, as for training
    source = source_name(args, dataset)
    data_dir = args.data_dir or (dataset.manifest["data_dir"] if dataset is not None else "")
    texts = get_text_source(source, data_dir=data_dir or None).split("train")
    if args.tokenizer:
        tokenizer = load_source_tokenizer(args.tokenizer)
        return Data(source, data_dir, texts, tokenizer, args.tokenizer, args.tokenizer)
    if dataset is not None:
        return Data(source, data_dir, texts, dataset.load_tokenizer(), f"{dataset.tokenizer_kind} (--prepared's)",
                    str(dataset.tokenizer_dir))
    # what lm_core.run_data.train_or_reuse_tokenizer trains for a sentencepiece run, from the same cache
    spec = tok.TokenizerSpec(vocab_size=vocab_size, seed=tokenizer_seed)
    tokenizer = tok.train_tokenizer((texts[i] for i in range(len(texts))), spec, cache_dir=tokenizer_cache_dir())
    path = scratch / tok.MODEL_FILENAME  # `prepare` takes a tokenizer by path
    tokenizer.save(path)
    return Data(source, data_dir, texts, tokenizer, f"sentencepiece BPE {vocab_size}", str(path))


def prepared_dataset(args: argparse.Namespace, data: Data, scratch: Path, given: Any) -> tuple[Any, float | None]:
    """(the dataset the prepared loader reads, seconds its preparation took; None for --prepared's)."""
    from experiments.registry import TEXT_SOURCE_MODULES
    from lm_core.data.prepared import open_prepared, prepare

    if given is not None:
        return given, None
    out = scratch / "prepared"
    start = time.perf_counter()
    prepare(data.source, data.tokenizer_spec, out, workers=args.workers, data_dir=data.data_dir or None,
            source_modules=TEXT_SOURCE_MODULES, compression=args.compression)
    return open_prepared(out), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Timing


def timed_pass(make_loader: Callable[[int], Iterator[Batch]], seed: int, batches: int | None
               ) -> tuple[int, int, float]:
    """(tokens, batches, seconds) of a fresh loader's first `batches` batches (None: as many as take
    TARGET_SECONDS); a single-pass loader may end sooner. The loader is made inside the timed span: a fresh one
    starts with nothing read or tokenised, as its first batch finds it."""
    tokens = count = 0
    start = time.perf_counter()
    for batch in make_loader(seed):
        tokens += int(batch["loss_mask"].sum())
        count += 1
        if count == batches or (batches is None and time.perf_counter() - start >= TARGET_SECONDS):
            break
    return tokens, count, time.perf_counter() - start


def measure(make_loader: Callable[[int], Iterator[Batch]], warmup: int, batches: int | None, repeats: int
            ) -> dict[str, float]:
    """Median tokens/s over `repeats` fresh loaders (seeds 1..repeats: each reaches other documents first).

    The warm-up batches come from another loader (seed 0), so they warm the process (source readers, the
    tokenizer's threads) without tokenising or reading ahead what a timed loader will need."""
    for _ in itertools.islice(make_loader(0), warmup):
        pass
    runs = [timed_pass(make_loader, seed, batches) for seed in range(1, repeats + 1)]
    return {"tokens_per_s": statistics.median(tokens / seconds for tokens, _, seconds in runs),
            "batches": min(count for _, count, _ in runs)}


def loader_factories(data: Data, dataset: Any, seq_len: int, batch_size: int, threads: int
                     ) -> dict[str, Callable[[int], Iterator[Batch]]]:
    """The loaders to time, by result key: `threads` is the prepared loader's prefetch thread count; when it is
    not 2, `prepared_threads2` times the same loader with 2 (what an accelerator host runs) for comparison."""
    from lm_core.data import LMDataLoader, PreparedTokensLoader
    from lm_core.data.grain_pipeline import GrainPackedLoader

    def on_the_fly(seed: int) -> Iterator[Batch]:
        # repeat=False: one pass, so no document is served from the loader's cache of tokenised documents
        return LMDataLoader(data.texts, data.tokenizer, seq_len=seq_len, global_batch_size=batch_size, seed=seed,
                            repeat=False)

    def grain_loader(prefetch_threads: int) -> Callable[[int], Iterator[Batch]]:
        # what training on tokens:DIR reads through (data.loader=grain)
        return lambda seed: GrainPackedLoader(dataset.split("train"), data.tokenizer, seq_len=seq_len,
                                              global_batch_size=batch_size, seed=seed, threads=prefetch_threads)

    def prepared_stream(seed: int) -> Iterator[Batch]:
        # repeats freely: it keeps only the documents of the next batches, so a second epoch costs what the first did
        return PreparedTokensLoader(dataset.split("train"), data.tokenizer, seq_len=seq_len,
                                    global_batch_size=batch_size, seed=seed)

    loaders = {"on_the_fly": on_the_fly, "prepared": grain_loader(threads), "prepared_stream": prepared_stream}
    if threads != 2:
        loaders["prepared_threads2"] = grain_loader(2)
    return loaders


# ---------------------------------------------------------------------------------------------------------------
# The report


def verdict(ratio: float, target: float, against: str) -> str:
    return f"prepared / {against}: {ratio:,.2f}x (target >= {target:g}x): {'met' if ratio >= target else 'NOT met'}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = args.config.config
    model_name, model = benchmark_model(config)
    seq_len = args.seq_len or config.data.seq_len
    batch_size = args.batch_size or config.data.global_batch_size
    result: dict[str, Any] = {
        "config": args.config.spec, "model": model_name, "config_seq_len": config.data.seq_len,
        "seq_len": seq_len, "batch_size": batch_size, "device": args.device, "mfu": args.mfu,
        "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
        **required_rate(model, config.data.seq_len, args.device, args.mfu)}
    with tempfile.TemporaryDirectory(prefix="benchmarks_data_") as scratch:
        from lm_core.data.grain_pipeline import prefetch_threads
        from lm_core.data.prepared import open_prepared

        given = open_prepared(args.prepared) if args.prepared else None
        data = open_data(args, args.vocab_size or model.vocab_size, config.data.get("tokenizer_seed", 0),
                         Path(scratch), given)
        dataset, result["prepare_seconds"] = prepared_dataset(args, data, Path(scratch), given)
        dataset.check_tokenizer(data.tokenizer, f"--tokenizer={data.tokenizer_name}")  # before any timing
        result.update(source=data.source, tokenizer=data.tokenizer_name, vocab_size=data.tokenizer.vocab_size,
                      prepared=args.prepared or None, documents=len(data.texts))
        result["prepared_threads"] = prefetch_threads(args.loader_threads)
        loaders = loader_factories(data, dataset, seq_len, batch_size, result["prepared_threads"])
        for name, make_loader in loaders.items():
            rate = measure(make_loader, args.warmup, args.batches, args.repeats)
            result[f"{name}_tokens_per_s"], result[f"{name}_batches"] = rate["tokens_per_s"], rate["batches"]
    result["prepared_vs_on_the_fly"] = result["prepared_tokens_per_s"] / result["on_the_fly_tokens_per_s"]
    result["prepared_vs_required"] = result["prepared_tokens_per_s"] / result["required_tokens_per_s"]
    result["prepared_vs_on_the_fly_verdict"] = verdict(result["prepared_vs_on_the_fly"], TARGET_VS_ON_THE_FLY,
                                                       "on the fly")
    result["prepared_vs_required_verdict"] = verdict(result["prepared_vs_required"], TARGET_VS_REQUIRED, "required")
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    prepared_how = ("--prepared" if result["prepare_seconds"] is None
                    else f"prepared in {result['prepare_seconds']:.1f} s")
    rows = [
        ("on the fly (LMDataLoader, first pass)", result["on_the_fly_tokens_per_s"],
         f"{result['on_the_fly_batches']} batches"),
        (f"prepared (grain, {result['prepared_threads']} prefetch threads)", result["prepared_tokens_per_s"],
         f"{result['prepared_batches']} batches; {prepared_how}"),
        *([("prepared (grain, 2 prefetch threads)", result["prepared_threads2_tokens_per_s"],
            f"{result['prepared_threads2_batches']} batches")] if "prepared_threads2_tokens_per_s" in result else []),
        ("prepared (data.loader=stream)", result["prepared_stream_tokens_per_s"],
         f"{result['prepared_stream_batches']} batches"),
        (f"required by {result['model']} per device", result["required_tokens_per_s"],
         f"seq {result['config_seq_len']}, {result['mfu']:.0%} MFU of {result['device']} "
         f"({result['peak_flops_per_s'] / 1e12:g} TFLOP/s), {result['training_flops_per_token']:,.0f} FLOPs/token"),
    ]
    return [
        f"data per host: {result['source']} ({result['documents']:,} train documents), {result['tokenizer']} "
        f"(V={result['vocab_size']}), seq {result['seq_len']} x batch {result['batch_size']}, "
        f"median of {result['repeats']}",
        *(f"  {label:<40}{rate:>14,.0f} tokens/s   ({detail})" for label, rate, detail in rows),
        result["prepared_vs_on_the_fly_verdict"],
        result["prepared_vs_required_verdict"],
    ]


def main() -> None:
    parser = make_parser()
    args = parse_args(parser)
    try:
        result = run(args)
    except UserError as error:  # a bad source, tokenizer or prepared directory: one line, exit 2
        parser.error(str(error))
    emit(result, args.json, report_lines(result))


if __name__ == "__main__":
    main()
