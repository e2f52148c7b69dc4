"""Compile a config's real train step ahead of time for a mesh you may not have, and say whether it fits.

    python -m experiments.compile_check --config=experiments/configs/kvp_paper.py --topology=v5p:2x4x4 \
        [--config.<field>=...] [--stage=<substring>] [--json]

Builds the train step exactly as the trainer would (the task's `step`, lm_core.task: the config's model, optimizer and
objective) on abstract inputs: no parameter is created, so a 1.5B model compiles on a laptop. One config can hold
several runs, each compiled and reported as a stage:
- a plain LM config (experiments.train_lm): one stage;
- a vocabulary sweep (`sweep.groups`): each model group at the sweep's largest vocabulary (its memory worst case);
- KV prediction (`kvp`): the base, each canonical pretraining, and each KVP (frozen base) and aux-only run;
- MoMa (`moma`): the variant's training step and, for a variant that routes batch-wide, its aux-router stage.
Topologies: TPU names such as v5p:2x4x4 or v5e:2x2 (needs libtpu: pip install -e '.[tpu]'), or cpu:N (N fake host
devices). `model.attention_impl=auto` resolves for the target's platform (splash on TPU). Printed per stage:
per-device argument / output / temporary / peak bytes, the device's memory, whether it fits (peak <= 90% of it),
matmul FLOPs per device of the compiled program next to the analytic count, with and without remat's
recomputation (`flops_ratio`, `flops_ratio_without_recompute`; kernels XLA cannot see into, such as splash
attention, are listed as `opaque_kernel_calls` and are not in the compiled count), and compile time.
`--json` prints one object with a `results` list of those
(keys topology, num_devices, device_kind, per_device_peak_bytes, device_memory_bytes, fits,
compiled_flops_per_device, analytic_flops_per_device, compile_s, collective_bytes (per device and step, by
kind: all-to-all, all-gather, all-reduce, reduce-scatter, collective-permute; lm_core.hlo_flops),
all_to_all_bytes_per_layer, ...). Bad topology, a mesh that does not match
the device count or a missing libtpu: one `error:` line and exit code 2. Exit code 1 when a stage does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "lm_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "Config file (any entrypoint's).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target: a TPU topology (v5p:2x4x4, v5e:2x2, ...) or cpu:N.",
                                required=True)
_STAGE = flags.DEFINE_string("stage", "", "Compile only the stages whose name contains this text.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


@dataclasses.dataclass
class Stage:
    name: str
    config: Any  # the lm_core training config (ml_collections.ConfigDict) of this run
    task: Any  # its lm_core.task.TrainTask
    # (config, mesh, batch) -> (lowered step, analytic FLOPs of one step) for a step that is not the trainer's
    # (MoMa's aux-router stage); None: lm_core.trainer's train step for `task`
    lower: Callable[[Any, Any, dict[str, Any]], tuple[Any, float]] | None = None


def stages_for(config: Any, num_devices: int | None = None) -> list[Stage]:
    """Every run a config describes, as (name, training config, task), for a mesh over `num_devices` devices
    (default: this process's)."""
    from lm_core.task import TrainTask

    if "kvp" in config:
        return _kvp_stages(config)
    if "sweep" in config:
        return _sweep_stages(config)
    if "moma" in config:
        return _moma_stages(config, num_devices)
    return [Stage("train", config, TrainTask())]


def _kvp_stages(config: Any) -> list[Stage]:
    import tempfile

    from experiments.kv_prediction.pipeline import plan

    # plan() only names run directories; nothing is read or written there
    runs = plan(config, Path(tempfile.gettempdir()) / "compile_check")
    return [Stage(name, stage, task) for name, _, stage, task in runs]


def _sweep_stages(config: Any) -> list[Stage]:
    from experiments.vocab_scaling.runner import parse_groups
    from experiments.vocab_scaling.task import group_run_config
    from lm_core.task import TrainTask

    largest = max(int(v) for v in config.sweep.vocab_sizes)
    return [Stage(f"{group.name} V={largest}", group_run_config(config, group, largest), TrainTask())
            for group in parse_groups(config.sweep.groups)]


def _moma_stages(config: Any, num_devices: int | None) -> list[Stage]:
    """The variant's training step, and for a variant that routes batch-wide its aux-router stage
    (experiments.moma.train_aux_routers: main model frozen, BCE on the expert-choice selections)."""
    import tempfile

    from experiments.moma.task import moma_config_from, moma_task
    from moma.aux_routers import variant_routes

    config = copy.deepcopy(config)
    task = moma_task(config, Path(tempfile.gettempdir()) / "compile_check", check_data=False,
                     num_devices=num_devices)
    stages = [Stage(f"moma {config.moma.variant}", config, task)]
    if variant_routes(moma_config_from(config)):
        stages.append(Stage(f"aux routers {config.moma.variant}", config, task, lower=_lower_aux_router_step))
    return stages


def _lower_aux_router_step(config: Any, mesh: Any, batch: dict[str, Any]) -> tuple[Any, float]:
    """The aux-router training step (moma.aux_routers.aux_router_step) on abstract sharded inputs."""
    import jax
    from flax import nnx

    from experiments.moma.task import moma_config_from
    from lm_core.run_config import model_config_from
    from lm_core.sharding import batch_sharding, replicated
    from lm_core.train_step import abstract_with_shardings, optimizer_state_layout, param_shardings
    from moma import aux_routers
    from moma.depths import build_moma_model
    from moma.flops import moma_flops_per_token

    model_config, moma = model_config_from(config), moma_config_from(config)

    def create() -> nnx.Module:
        model = build_moma_model(model_config, moma, rngs=nnx.Rngs(0))
        aux_routers.attach_aux_routers(model, model_config, rngs=nnx.Rngs(1))
        return model

    graphdef, aux_params, frozen = nnx.split(nnx.eval_shape(create), aux_routers.AUX_ROUTER_PARAMS, ...)
    optimizer = aux_routers.aux_router_optimizer()
    aux_shardings, frozen_shardings = param_shardings(mesh, aux_params), param_shardings(mesh, frozen)
    opt_shapes, opt_shardings = optimizer_state_layout(optimizer, aux_params, aux_shardings, mesh)
    inputs = {name: value for name, value in batch.items() if name in aux_routers.MODEL_INPUTS}
    in_shardings = (aux_shardings, opt_shardings, frozen_shardings,
                    {name: batch_sharding(mesh, value.ndim) for name, value in inputs.items()})
    step = jax.jit(aux_routers.aux_router_step(graphdef, optimizer), in_shardings=in_shardings,
                   out_shardings=(aux_shardings, opt_shardings, replicated(mesh)), donate_argnums=(0, 1))
    arguments = (abstract_with_shardings(aux_params, aux_shardings), abstract_with_shardings(opt_shapes, opt_shardings),
                 abstract_with_shardings(frozen, frozen_shardings), inputs)
    with jax.set_mesh(mesh):
        lowered = step.lower(*arguments)
    # the main model's forward (no backward: the aux routers read its hidden states, nothing flows back into it)
    forward = moma_flops_per_token(model_config, moma, config.data.seq_len, config.moma.image_fraction).forward
    return lowered, forward * config.data.global_batch_size * config.data.seq_len


def compile_stage(stage: Stage, target: Any) -> dict[str, Any]:
    """Lower and compile one stage's train step for the target; the report as a JSON-able dict."""
    import jax

    from lm_core import aot, sharding
    from lm_core.attention import resolve_attention_impl
    from lm_core.data.packing import PackedBatch
    from lm_core.run_config import validate_run_config
    from lm_core.train_step import check_batch_fits

    config = copy.deepcopy(stage.config)
    config.unlock()
    config.model.attention_impl = resolve_attention_impl(config.model.attention_impl, target.platform)
    validate_run_config(config)
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()), target.devices)
    rows, seq = config.data.global_batch_size, config.data.seq_len
    check_batch_fits(mesh, rows, config.grad_accum_steps)
    zeros = PackedBatch.zeros(1, seq).as_dict()
    batch = {name: jax.ShapeDtypeStruct((rows, seq), value.dtype) for name, value in zeros.items() if name != "chars"}
    lowered, analytic_per_step = (stage.lower or _lower_train_step(stage.task))(config, mesh, batch)
    report = aot.compile_lowered(lowered)
    devices = len(target.devices)
    analytic = analytic_per_step / devices
    return dict(stage=stage.name, topology=target.name, num_devices=devices, device_kind=target.device_kind,
                mesh=dict(mesh.shape), per_device_batch=rows / sharding.batch_shards(mesh),
                grad_accum_steps=config.grad_accum_steps, remat=config.model.remat,
                scan_layers=config.model.scan_layers, attention_impl=config.model.attention_impl,
                **dataclasses.asdict(report), device_memory_bytes=target.device_memory_bytes,
                fits=report.per_device_peak_bytes <= aot.FIT_FRACTION * target.device_memory_bytes,
                analytic_flops_per_device=analytic, flops_ratio=report.compiled_flops_per_device / analytic,
                flops_ratio_without_recompute=(report.compiled_flops_per_device
                                               - report.recomputed_flops_per_device) / analytic,
                all_to_all_bytes_per_layer=report.collective_bytes.get("all-to-all", 0.0) / config.model.num_layers)


def _lower_train_step(task: Any) -> Callable[[Any, Any, dict[str, Any]], tuple[Any, float]]:
    """The trainer's train step for `task`, built as `lm_core.trainer.train` builds it, on abstract inputs."""
    from lm_core.train_step import make_train_step, train_state_layout

    def lower(config: Any, mesh: Any, batch: dict[str, Any]) -> tuple[Any, float]:
        parts = task.step(config)
        graphdef, state, shardings = train_state_layout(parts.create_model, parts.optimizer, mesh)
        step = make_train_step(graphdef, parts.loss_fn, parts.optimizer, mesh, shardings,
                               grad_accum_steps=config.grad_accum_steps)
        tokens = config.data.global_batch_size * config.data.seq_len
        return step.lower(state, batch), parts.training_flops_per_token * tokens

    return lower


def describe(result: dict[str, Any]) -> str:
    gib = 2**30
    return (f"{result['stage']}: {result['topology']} ({result['num_devices']} x {result['device_kind']}, mesh "
            f"{result['mesh']}, {result['per_device_batch']:g} rows/device, remat {result['remat']}, "
            f"attention {result['attention_impl']})\n"
            f"  per device: arguments {result['argument_bytes'] / gib:.2f} GiB, outputs "
            f"{result['output_bytes'] / gib:.2f} GiB (aliased {result['alias_bytes'] / gib:.2f}), temporaries "
            f"{result['temp_bytes'] / gib:.2f} GiB -> peak {result['per_device_peak_bytes'] / gib:.2f} GiB of "
            f"{result['device_memory_bytes'] / gib:.1f} GiB: {'fits' if result['fits'] else 'DOES NOT FIT'}\n"
            f"  matmul FLOPs per device: compiled {result['compiled_flops_per_device']:.3e}, analytic "
            f"{result['analytic_flops_per_device']:.3e} ({result['flops_ratio']:.3f}x; without remat's recompute "
            f"{result['flops_ratio_without_recompute']:.3f}x){_opaque(result['opaque_kernel_calls'])}; XLA cost "
            f"analysis {result['xla_cost_analysis_flops']:.3e} (counts loop bodies once); compile "
            f"{result['compile_s']:.1f} s\n"
            f"  collectives per device and step: {_collectives(result['collective_bytes'])}; all-to-all per layer "
            f"{result['all_to_all_bytes_per_layer'] / 2**20:.1f} MiB")


def _opaque(calls: dict[str, float]) -> str:
    if not calls:
        return ""
    return f"; not counted: {sum(calls.values()):g} opaque kernel calls ({', '.join(sorted(calls))})"


def _collectives(by_kind: dict[str, float]) -> str:
    return ", ".join(f"{kind} {amount / 2**30:.2f} GiB" for kind, amount in sorted(by_kind.items())) or "none"


def main(argv: list[str]) -> None:
    del argv
    from lm_core import aot

    aot.prepare_environment(_TOPOLOGY.value)
    from experiments.registry import register_text_sources
    from lm_core.errors import UserError

    register_text_sources()
    target = aot.target_for(_TOPOLOGY.value)
    every_stage = stages_for(_CONFIG.value, len(target.devices))
    stages = [s for s in every_stage if _STAGE.value in s.name]
    if not stages:
        raise UserError(f"--stage={_STAGE.value!r} matches no stage; this config's stages: "
                        f"{[s.name for s in every_stage]}")
    results = []
    for stage in stages:
        results.append(compile_stage(stage, target))
        if not _JSON.value:
            print(describe(results[-1]), flush=True)
    if _JSON.value:
        single = results[0] if len(results) == 1 else {}
        print(json.dumps({**single, "results": results}, indent=1, default=str))
    if not all(r["fits"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
