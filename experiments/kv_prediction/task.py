"""A KV-prediction workdir's runs as lm_core's trainer sees them: where each run lives, the weights its auxiliary
starts from, and the TrainTasks of the KVP run (`kvp_task`: auxiliary + predictor with the 3-term loss, base
frozen) and of the aux-only baseline (`aux_only_task`). `kvp_builder(aux)` builds a KVP run's module, for
training and for loading (`load_trained_model(kvp_dir(workdir, aux), kvp_builder(aux))`).

    DIR/base            the base LM, frozen once trained
    DIR/pre_<c...>      a canonical auxiliary pretrained as an LM (kvp.pretrain_canonical)
    DIR/kvp_<name>      auxiliary + predictor, base frozen
    DIR/aux_<name>      the aux-only baseline, from the same initial weights as the KVP auxiliary
    DIR/kvp_config.json the whole config (experiments.kv_prediction.pipeline writes it)

`KVPConfig` is the config's `kvp.*` section, checked (`kvp_config_from(config)`); experiments/configs/kvp_tiny.py
sets the section from its defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from kv_prediction.auxiliary import build_layer_pruned
from kv_prediction.cost import predictor_flops_per_token
from kv_prediction.loss import kvp_loss
from kv_prediction.optim import make_kvp_optimizer
from kv_prediction.variants import AuxSpec, build_kvp_model
from lm_core.config import ModelConfig
from lm_core.distributed import place_like
from lm_core.errors import UserError
from lm_core.flops import flops_per_token
from lm_core.model import Transformer
from lm_core.run_config import from_section, model_config_from, optimizer_config_from
from lm_core.task import ModelBuilder, StepParts, TrainTask, lm_step_parts
from lm_core.train_step import TrainState
from lm_core.trained_runs import load_trained_model, run_state

CONFIG_FILE = "kvp_config.json"

# --- the kvp.* section ----------------------------------------------------------------------------------------

# integer fields: (the smallest valid value, what the bound means when it needs saying)
_INT_BOUNDS = {
    "steps": (1, ""), "eval_questions": (0, " (0: every fact of the table, and 512 recall documents)"),
    "answer_tokens": (1, ""), "eval_documents": (1, ""),
    # the KVP path reads all but a prompt's last token through the auxiliary: one token would leave it nothing
    "prompt_tokens": (2, " (the auxiliary reads all but the last prompt token)"), "continuation_tokens": (1, ""),
    "ttft_prompt_len": (2, " (the auxiliary reads all but the last prompt token)"), "ttft_batch": (1, ""),
    "ttft_repeats": (1, ""),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count here


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class KVPConfig:
    """The config's `kvp.*` section: which auxiliaries, how they train and how the family is evaluated."""

    # auxiliary specs: lp<fraction> (layer-pruned base), c<d_model>x<layers> (canonical), c:<lm_core workdir>,
    # each optionally @<layer map> (kv_prediction.variants)
    variants: tuple[str, ...] = ("lp0.50", "lp0.25", "c96x2", "c64x2")
    steps: int = 500  # auxiliary + predictor training steps (and the aux-only baseline's fine-tuning steps)
    learning_rate: float = 1e-3  # of the KVP and aux-only runs (the base and pretraining use optimizer.*)
    pretrain_canonical: bool = True  # canonical auxiliaries are first trained as LMs for `steps` (as in the paper)
    lambda_base: float = 1.0  # λ_B: weight of the base's CE on the predicted K,V
    lambda_aux: float = 1.0  # λ_A: weight of the auxiliary's own CE
    # λ_C; None: the paper's default 1/n_base_layers; 0 turns the consistency term off (the paper's ablation)
    lambda_consistency: float | None = None
    eval_questions: int = 0  # questions per task (0: every fact of the table, and 512 recall documents)
    answer_tokens: int = 8  # greedy tokens generated per question
    eval_documents: int = 32  # held-out validation documents for continuation perplexity
    prompt_tokens: int = 64  # prompt length of the perplexity evaluation (the rest of each window is continuation)
    continuation_tokens: int = 32  # scored tokens after each perplexity prompt
    ttft_prompt_len: int = 256  # prompt length of the TTFT measurement
    ttft_batch: int = 1  # prompts per timed TTFT call
    ttft_repeats: int = 20  # timed TTFT calls per model (the median is reported)
    demo_only: bool = False  # True: the report says the run is too small to show the paper's effect
    # "" trains the base here (DIR/base); an lm_core workdir (e.g. from experiments.import_hf) is the frozen
    # base instead, its model and tokenizer replacing config.model and config.data's tokenizer fields
    base: str = ""

    def __post_init__(self) -> None:
        # a saved kvp_config.json holds a list, a config file may give one spec as a plain string
        variants = (self.variants,) if isinstance(self.variants, str) else self.variants
        if not isinstance(variants, tuple | list) or not all(isinstance(spec, str) for spec in variants):
            raise UserError(f"kvp.variants={self.variants!r} is invalid; valid: a tuple of auxiliary specs, e.g. "
                            "('lp0.50', 'c64x2')")
        if not variants:
            raise UserError("kvp.variants is empty; valid: a tuple of auxiliary specs, e.g. ('lp0.50', 'c64x2')")
        object.__setattr__(self, "variants", tuple(variants))
        for name, (minimum, meaning) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise UserError(f"kvp.{name}={value!r} is invalid; valid: an integer >= {minimum}{meaning}")
        if not (_is_finite_number(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"kvp.learning_rate={self.learning_rate!r} is invalid; valid: a finite number > 0")
        for name in ("lambda_base", "lambda_aux"):
            if not (_is_finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"kvp.{name}={getattr(self, name)!r} is invalid; valid: a finite number >= 0")
        weight = self.lambda_consistency
        if weight is not None and not (_is_finite_number(weight) and weight >= 0):
            raise UserError(f"kvp.lambda_consistency={weight!r} is invalid; valid: a finite number >= 0 (0 turns the "
                            "consistency loss off), or None for the paper's 1/n_base_layers")
        for name in ("pretrain_canonical", "demo_only"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"kvp.{name}={getattr(self, name)!r} is invalid; valid: True or False")
        if not isinstance(self.base, str):
            raise UserError(f"kvp.base={self.base!r} is invalid; valid: \"\" (train the base here) or an lm_core "
                            "workdir")


def kvp_config_from(config: ml_collections.ConfigDict) -> KVPConfig:
    """The run's `kvp.*` section checked: a key that is no KVPConfig field is refused, a field a config.json of an
    earlier version lacks gets its default."""
    return from_section(KVPConfig, config.kvp, "kvp")


def base_dir(workdir: Path) -> Path:
    return workdir / "base"


def kvp_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"kvp_{aux.name}"


def aux_only_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"aux_{aux.name}"


def pretrain_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"pre_{aux.name.split('@')[0]}"


# --- initial weights ------------------------------------------------------------------------------------------


def load_base(workdir: Path, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The frozen base; with `mesh`, its parameters restored straight into their shardings there."""
    model, _, _ = load_trained_model(base_dir(workdir), mesh=mesh)
    return model


def aux_init_dir(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> Path | None:
    """The lm_core run a canonical auxiliary starts from (None: layer-pruned, or canonical from random init)."""
    if aux.pretrained is not None:
        return aux.pretrained
    if not aux.layer_pruned and kvp_config_from(config).pretrain_canonical:
        return pretrain_dir(workdir, aux)
    return None


def check_same_tokenizer(base_run: Path, aux_run: Path) -> None:
    """A canonical auxiliary from another run must read the base's token ids: the same tokenizer files
    (tokenizer.model, or a pretrained tokenizer's tokenizer/ directory; none in either: both byte tokenizers)."""
    from lm_core.hf_tokenizer import workdir_tokenizer_files

    if workdir_tokenizer_files(base_run) != workdir_tokenizer_files(aux_run):
        raise UserError(f"the auxiliary run {aux_run} was trained with a different tokenizer than the base "
                        f"({base_run}); both models must read the same token ids: train the auxiliary on the same "
                        "data.source / data.tokenizer / model.vocab_size")


def initial_aux(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> Transformer:
    """The weights the KVP auxiliary and the aux-only baseline both start from."""
    if aux.layer_pruned:
        return build_layer_pruned(load_base(workdir), aux.keep_fraction, nnx.Rngs(config.seed))
    init_dir = aux_init_dir(config, workdir, aux)
    if init_dir is None:
        return Transformer(aux.config, rngs=nnx.Rngs(config.seed + 1))
    check_same_tokenizer(base_dir(workdir), init_dir)
    model, _, _ = load_trained_model(init_dir)
    if model.config != aux.config:
        raise UserError(f"the auxiliary run {init_dir} holds a {model.config.num_layers}-layer d_model="
                        f"{model.config.d_model} model, not the one its spec {aux.spec!r} describes")
    return model


# --- tasks ----------------------------------------------------------------------------------------------------


def kvp_training_flops_per_token(base: ModelConfig, aux: ModelConfig, seq_len: int) -> float:
    """≈ base forward on predicted KV + its backward to the activations (2x forward, no weight gradients) + the
    no-gradient true-KV pass + aux and predictor forward and backward (3x forward each)."""
    base_forward = flops_per_token(base, seq_len).forward
    return 3 * base_forward + flops_per_token(aux, seq_len).training + 3 * predictor_flops_per_token(base, aux)


def kvp_builder(aux: AuxSpec) -> ModelBuilder:
    """How a KVP run's module (frozen base + auxiliary + predictor) is built: what training and loading share."""
    return lambda model_config, seed: build_kvp_model(model_config, aux, seed)


def kvp_task(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> TrainTask:
    kvp = kvp_config_from(config)

    def initialize(state: TrainState) -> TrainState:
        params = state.params
        mesh = jax.tree.leaves(params["base"])[0].sharding.mesh  # the training mesh: no copy through one device
        params["base"] = place_like(params["base"], nnx.state(load_base(workdir, mesh), nnx.Param))
        params["aux"] = place_like(params["aux"], nnx.state(initial_aux(config, workdir, aux), nnx.Param))
        return state._replace(params=params)

    loss = functools.partial(kvp_loss, lambda_base=kvp.lambda_base, lambda_aux=kvp.lambda_aux,
                             lambda_consistency=kvp.lambda_consistency, z_loss_weight=config.z_loss,
                             chunk_tokens=config.loss_chunk_tokens)
    flops = kvp_training_flops_per_token(model_config_from(config), aux.config, config.data.seq_len)

    def step(run_config: ml_collections.ConfigDict) -> StepParts:
        """The plain step's parts with the KVP module, its 3-term loss, the base frozen in the optimizer."""
        return dataclasses.replace(lm_step_parts(run_config, kvp_builder(aux)), loss_fn=loss,
                                   optimizer=make_kvp_optimizer(optimizer_config_from(run_config)),
                                   training_flops_per_token=flops)

    return TrainTask(step=step, initialize=initialize,
                     meta={"kvp_variant": aux.name, "aux_model": aux.config.to_dict(),
                           "layer_map": list(aux.layer_map), "built_on": built_on(config, workdir, aux)})


def aux_only_task(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> TrainTask:
    def initialize(state: TrainState) -> TrainState:
        return state._replace(params=place_like(state.params, nnx.state(initial_aux(config, workdir, aux),
                                                                       nnx.Param)))

    return TrainTask(initialize=initialize, meta={"aux_only_variant": aux.name,
                                                  "built_on": built_on(config, workdir, aux)})


def built_on(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> dict[str, str | None]:
    """{upstream run: its state} for the runs a KVP / aux-only run starts from (the base, and the pretrained or
    pretraining run of a canonical auxiliary). Saved with the run's checkpoints and compared when it is resumed
    or found finished, so a run built on a base that has since trained on (or been replaced) is refused, not reused."""
    upstream = {"base": base_dir(workdir)}
    init_dir = aux_init_dir(config, workdir, aux)
    if init_dir is not None:
        upstream["aux_init"] = init_dir
    return {name: run_state(directory) for name, directory in upstream.items()}
