"""Registered reproduction of Tao et al. 2024: the vocabulary sweep at the requested scale, plus its report."""

from __future__ import annotations

from pathlib import Path

from experiments.registry import Section

NAME = "vocab_scaling"
TITLE = "vocab_scaling: Scaling Laws with Vocabulary (Tao et al. 2024)"


def run(scale: str, workdir: Path) -> Section:
    from experiments.configs import vocab_sweep_small, vocab_sweep_tiny
    from experiments.vocab_scaling.runner import run_sweep

    config = vocab_sweep_small.get_config() if scale == "small" else vocab_sweep_tiny.get_config(
        "demo" if scale == "demo" else "tiny")
    report = run_sweep(config, workdir)
    fitted = (workdir / "fits.json").read_text() if (workdir / "fits.json").exists() else "{}"
    import json

    fits = json.loads(fitted)
    summary = (f"{len(list((workdir / 'runs').iterdir()))} training runs over vocabulary sizes "
               f"{', '.join(str(v) for v in config.sweep.vocab_sizes)}; fitted: {', '.join(fits.get('fitted', []))}"
               f"{'; not fitted: ' + ', '.join(fits['failures']) if fits.get('failures') else ''}. "
               "IsoFLOP curves in `vocab_scaling/isoflop.png`; the paper's table from its coefficients in the "
               "report. " + " ".join(fits.get("claims", [])))
    return Section(TITLE, report, summary)
