"""Vocabulary scaling sweep: train real models over vocabulary sizes and FLOPs budgets, fit Approaches 1-3.

    python -m experiments.vocab_scaling.sweep --config=experiments/configs/vocab_sweep_tiny.py --workdir=DIR

Steps: (1) train a sentencepiece tokenizer per vocabulary size V, measure tokens per character on held-out text and
fit f(V) = a·ln²V + b·lnV + c; (2) plan model groups x V x budgets as an IsoFLOP design (the characters H each run
sees follow from its budget C = 6 (N_nv + V·d) H f(V)); the runs at `sweep.seeded_vocab_sizes` repeat with
`sweep.extra_seeds` for a noise bar; (3) train every run with lm_core, evaluating the unigram-normalised loss L_u
and bits per character along the way on the same validation text at every V (whole documents, up to
`sweep.eval_chars` characters; 0 = the whole split); (4) fit Approaches 1-3 on our points and write DIR/REPORT.md
with IsoFLOP curves, the f(V) plot, fitted constants, predictions next to the paper's, and one line per claim of
the paper saying whether our runs show it (against the seed-to-seed noise bar; plus each group's optimum between
grid points, a quadratic in ln V, for information); DIR/results.csv has one row per
evaluation. Rerunning skips finished runs; SIGTERM stops the sweep (exit 143) and a rerun resumes the
interrupted run from its checkpoint.
Configs: vocab_sweep_tiny.py (27.5 min on 2 CPU cores; `:demo` ~2 min), vocab_sweep_small.py, vocab_sweep_paper.py.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "vocab_sweep_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs, results.csv, plots and REPORT.md go.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.vocab_scaling.runner import run_sweep

    report = run_sweep(_CONFIG.value, Path(_WORKDIR.value))
    print(f"wrote {report}")


if __name__ == "__main__":
    run(main)
