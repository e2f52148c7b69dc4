"""Train MoMa's auxiliary routers on a trained run and compare causal (aux-routed) with expert-choice eval loss.

    python -m experiments.moma.train_aux_routers --workdir=DIR [--steps=200] [--learning_rate=1e-3] \\
        [--eval_batches=0] [--causal_capacity=1.0] [--json]

DIR is a finished `python -m experiments.moma.train` run of a variant that routes (moe_<m>t<n>i with m or n > 1,
moe_<n>x, or any mod_ variant; dense and moe_1t1i decide nothing batch-wide and are refused). The main model is
frozen; one aux router per routed expert group and per MoD layer (moma.aux_routers) learns, with binary
cross-entropy on the run's training stream, to predict the expert-choice selections. Then the run's evaluation
batches are scored twice: with expert choice (non-causal, what training saw) and with each token routed by its own
aux scores (> 0.5; the main router still gates), which is what token-by-token inference can do.

Writes DIR/aux_routers/: checkpoints/ (the aux-router parameters, Orbax via lm_core's Checkpointer), metrics.jsonl
(training curve), results.json (what `run` returns). Rerunning with the same settings reuses the saved routers and
only re-evaluates; other settings on an existing DIR/aux_routers are refused (move it away to retrain), and so are
routers trained on an earlier state of the run (they record its step and loss: once DIR has trained on, they
predict the selections of a model that is gone).

Expected, measured on 2 busy CPU cores (a demo run: `python -m experiments.moma.train
--config=experiments/configs/moma_tiny.py:demo --workdir=DIR`, 40 steps; then this with the default 200 steps):
moe_4t4i: ~40 s; aux-router accuracy 0.93 (recall 0.85; text 0.95, image 0.90), eval loss non-causal 2.671
(text 2.185, image 3.381) vs causal 2.675 (text 2.207, image 3.358). Same with
`--config.moma.variant=mod_moe_4t4i`: ~1m45s; accuracy 0.94 (text 0.94, image 0.90, MoD 0.99), non-causal 2.929 vs
causal 2.956, the MoD layers passing 25.5% of tokens causally. Both small gaps; MoD's is the larger, as in the
paper (MoD models degrade under causal inference, MoE ones hardly do).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from absl import flags

from experiments.cli import run as run_main
from lm_core.atomic_files import write_json_atomically, write_jsonl_atomically

OUTPUT_DIR = "aux_routers"


@dataclasses.dataclass(frozen=True)
class AuxRouterConfig:
    """How the aux routers are trained and evaluated (saved with them; a rerun must match)."""

    steps: int = 200  # BCE steps, one training batch each
    learning_rate: float = 1e-3
    eval_batches: int = 0  # 0 = the run's own eval_batches
    causal_capacity: float = 1.0  # causal slots per expert as a share of the batch (1.0: no token is ever dropped)
    seed: int = 0  # aux-router initialisation
    log_every: int = 20

    def __post_init__(self) -> None:
        from lm_core.errors import UserError

        for name in ("steps", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise UserError(f"eval_batches={self.eval_batches!r} must be an integer >= 0 (0 = the run's own)")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0 < self.causal_capacity <= 1:
            raise UserError(f"causal_capacity={self.causal_capacity} must be in (0, 1] (1.0 = no token dropped)")

    def training_meta(self) -> dict[str, Any]:
        """What determines the trained routers (evaluation settings may change between reruns)."""
        return {"steps": self.steps, "learning_rate": self.learning_rate, "seed": self.seed}


def define_flags() -> None:
    """Flags exist only when this file is the entrypoint, so other modules can import `run`."""
    defaults = AuxRouterConfig()
    flags.DEFINE_string("workdir", None, "A trained MoMa run (python -m experiments.moma.train).", required=True)
    flags.DEFINE_integer("steps", defaults.steps, "Aux-router training steps.")
    flags.DEFINE_float("learning_rate", defaults.learning_rate, "Adam learning rate of the aux routers.")
    flags.DEFINE_integer("eval_batches", defaults.eval_batches, "Evaluation batches (0 = the run's eval_batches).")
    flags.DEFINE_float("causal_capacity", defaults.causal_capacity,
                       "Causal slots per expert as a share of the batch's tokens (1.0 never drops a token).")
    flags.DEFINE_integer("seed", defaults.seed, "Aux-router initialisation seed.")
    flags.DEFINE_bool("json", False, "Print the results as one JSON object instead of a summary line.")


# --- seams onto the MoMa training entrypoint (experiments.moma.train) --------------------------------------------


def load_run(workdir: Path):  # -> (model, run config ConfigDict, MoMaConfig)
    """The trained model, its config and MoMa variant; refuses variants with nothing to route before loading."""
    from experiments.moma.task import load_moma, moma_config_from, read_run_config
    from moma.aux_routers import check_variant_routable

    moma = moma_config_from(read_run_config(workdir))
    check_variant_routable(moma)
    model, config = load_moma(workdir)
    return model, config, moma


def training_stream(run_config, workdir: Path) -> Iterator[dict[str, Any]]:
    """The run's own training stream from its start (same seed, same pairs and tokenizer)."""
    from experiments.moma.task import image_source, make_mixed_data
    from lm_core.run_config import model_config_from

    data = make_mixed_data(run_config, workdir, model_config_from(run_config), image_source(run_config))
    while True:
        yield data.loader.next()


def eval_batches(workdir: Path, count: int) -> list[dict[str, Any]]:
    from experiments.moma.task import mixed_eval_batches

    return mixed_eval_batches(workdir, max_batches=count or None)


# --- saving and loading the routers -------------------------------------------------------------------------------


def save_aux_routers(model, directory: Path, step: int, meta: dict[str, Any]) -> None:
    """The aux-router parameters alone, as an lm_core (Orbax) checkpoint: written atomically, then renamed."""
    from flax import nnx

    from lm_core.checkpoint import Checkpointer
    from moma.aux_routers import AUX_ROUTER_PARAMS

    checkpointer = Checkpointer(directory, keep=1)
    checkpointer.save(step, nnx.state(model, AUX_ROUTER_PARAMS), {}, meta, wait=True)
    checkpointer.close()


def restore_aux_routers(model, directory: Path, expected_meta: dict[str, Any]) -> bool:
    """Load saved aux routers into `model` (routers attached) if `directory` holds some; False if it holds none.

    Routers trained with other settings are refused rather than silently reused or overwritten.
    """
    import jax
    from flax import nnx

    from lm_core.checkpoint import Checkpointer
    from lm_core.errors import UserError
    from lm_core.trained_runs import differing_meta
    from moma.aux_routers import AUX_ROUTER_PARAMS

    if not directory.is_dir():
        return False
    checkpointer = Checkpointer(directory, keep=1)
    step = checkpointer.latest_step()
    if step is None:
        checkpointer.close()
        return False
    saved = checkpointer.read_meta(step)
    differing = differing_meta(saved, expected_meta)  # routers saved before built_on existed are still reused
    if differing:
        checkpointer.close()
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {expected_meta[k]!r}" for k in differing)
        remedy = ("the run they were trained on has trained on since: move the directory away to retrain"
                  if "built_on" in differing else
                  "rerun with those settings to re-evaluate, or move the directory away to retrain")
        raise UserError(f"{directory} holds aux routers trained with other settings ({details}); {remedy}")
    current = nnx.state(model, AUX_ROUTER_PARAMS)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    nnx.update(model, checkpointer.restore(step, abstract).state)
    checkpointer.close()
    return True


# --- the run ------------------------------------------------------------------------------------------------------


def run(config: AuxRouterConfig | None, workdir: str | Path) -> dict[str, float]:
    """Train (or reload) the aux routers of the MoMa run in `workdir` and evaluate causal vs expert-choice routing.

    Returns floats: aux_router_accuracy, aux_router_recall, aux_router_bce and the same per group
    (text_/image_/mixed_/mod_aux_router_*, for the groups the variant has); noncausal_loss, noncausal_text_loss,
    noncausal_image_loss; causal_loss, causal_text_loss, causal_image_loss; causal_minus_noncausal_loss;
    train_steps; for MoD variants also {noncausal,causal}_mod_selected_fraction and causal_mod_causal_overflow.
    Raises UserError for a workdir without a trained MoMa run or a variant with nothing to route.
    """
    from flax import nnx

    from lm_core.trained_runs import run_state
    from moma.aux_routers import attach_aux_routers, evaluate_routing

    config = config or AuxRouterConfig()
    workdir = Path(workdir).absolute()
    model, run_config, moma = load_run(workdir)
    output = workdir / OUTPUT_DIR
    attach_aux_routers(model, model.config, rngs=nnx.Rngs(config.seed))
    # the model state they learn to route for (keyed "run", not by path: a moved run keeps its routers)
    meta = {"variant": moma.variant, **config.training_meta(), "built_on": {"run": run_state(workdir)}}
    if restore_aux_routers(model, output / "checkpoints", meta):
        print(f"reusing the aux routers in {output / 'checkpoints'}", flush=True)
    else:
        history = train_with_progress(model, training_stream(run_config, workdir), config)
        save_aux_routers(model, output / "checkpoints", config.steps, meta)
        write_jsonl_atomically(output / "metrics.jsonl", history)
    batches = eval_batches(workdir, config.eval_batches)
    results = evaluate_routing(model, batches, moma.image_token_range, causal_capacity=config.causal_capacity)
    results["causal_minus_noncausal_loss"] = results["causal_loss"] - results["noncausal_loss"]
    results["train_steps"] = float(config.steps)
    write_json_atomically(output / "results.json", {"variant": moma.variant, **dataclasses.asdict(config), **results},
                          sort_keys=True)
    return results


def train_with_progress(model, stream: Iterator[dict[str, Any]], config: AuxRouterConfig) -> list[dict[str, float]]:
    """Train the aux routers, printing step, BCE, accuracy and an ETA every `log_every` steps."""
    from moma.aux_routers import train_aux_routers

    history, start = [], time.monotonic()
    for step, metrics in enumerate(train_aux_routers(model, stream, config.steps,
                                                     learning_rate=config.learning_rate), start=1):
        history.append({"step": step, **metrics})
        if step % config.log_every == 0 or step == config.steps:
            eta = (time.monotonic() - start) / step * (config.steps - step)
            print(f"aux routers step {step}/{config.steps} | bce {metrics['aux_router_bce']:.4f} | accuracy "
                  f"{metrics['aux_router_accuracy']:.3f} | recall {metrics['aux_router_recall']:.3f} | "
                  f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
    return history


def summary(results: dict[str, float]) -> str:
    groups = ", ".join(f"{g} {results[f'{g}_aux_router_accuracy']:.3f}" for g in ("text", "image", "mixed", "mod")
                       if f"{g}_aux_router_accuracy" in results)

    def losses(label: str) -> str:
        parts = [f"{m} {results[f'{label}_{m}_loss']:.4f}" for m in ("text", "image") if f"{label}_{m}_loss" in results]
        return f"{results[f'{label}_loss']:.4f}" + (f" ({', '.join(parts)})" if parts else "")

    return (f"aux routers: accuracy {results['aux_router_accuracy']:.3f} (recall {results['aux_router_recall']:.3f};"
            f" {groups}) | eval loss non-causal {losses('noncausal')} | causal {losses('causal')}")


def main(argv: list[str]) -> None:
    del argv
    values = flags.FLAGS
    config = AuxRouterConfig(steps=values.steps, learning_rate=values.learning_rate, eval_batches=values.eval_batches,
                             causal_capacity=values.causal_capacity, seed=values.seed)
    results = run(config, values.workdir)
    print(json.dumps(results, sort_keys=True) if values.json else summary(results), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    run_main(main)
