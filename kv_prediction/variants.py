"""Auxiliary-model specs as written in configs, resolved against the base config.

    lp<fraction>          layer-pruned base keeping that fraction of its layers: lp0.75, lp0.50, lp0.25
    c<d_model>x<layers>   canonical: a smaller model of the base's family, e.g. c64x2 (d_model 64, 2 layers)
    c:<workdir>           canonical: the model an lm_core run in <workdir> trained (its config and weights)
    <any of these>@<map>  with an explicit layer map, one aux layer per base layer: c64x2@0,0,1,1

`resolve_spec` turns a spec into an `AuxSpec` (aux config, layer map, where its weights start) or raises a
UserError naming what is wrong: an unknown form, an auxiliary that is not smaller than the base, a vocabulary that
differs from the base's, a layer map of the wrong length, out of range or not monotone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from flax import nnx

from kv_prediction.auxiliary import layer_pruned_config, validate_pair
from kv_prediction.layer_map import default_layer_map, layer_pruned_layer_map, validate_layer_map
from kv_prediction.model import KVPModel
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.model import Transformer

VALID = ("lp<fraction> (lp0.75, lp0.50, lp0.25), c<d_model>x<layers> (e.g. c64x2) or c:<lm_core workdir>, "
         "optionally followed by @<layer map> (e.g. c64x2@0,0,1,1)")


@dataclasses.dataclass(frozen=True)
class AuxSpec:
    spec: str  # as written in the config
    name: str  # file-system friendly: run directories are kvp_<name> and aux_<name>
    config: ModelConfig
    layer_map: tuple[int, ...]
    keep_fraction: float | None = None  # layer-pruned: starts as the base's kept layers
    pretrained: Path | None = None  # c:<workdir>: starts as that run's model

    @property
    def layer_pruned(self) -> bool:
        return self.keep_fraction is not None


def _parse_layer_map(text: str, spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(entry) for entry in text.split(","))
    except ValueError:
        raise UserError(f"auxiliary spec {spec!r}: layer map {text!r} is not a comma-separated list of integers; "
                        f"valid: {VALID}") from None


def keep_fraction(spec: str) -> float:
    try:
        value = float(spec[2:])
    except ValueError:
        raise UserError(f"auxiliary spec {spec!r} is not valid; valid: {VALID}") from None
    if not 0 < value < 1:
        raise UserError(f"auxiliary spec {spec!r}: the kept fraction must be in (0, 1); valid: {VALID}")
    return value


def canonical_config(base: ModelConfig, spec: str) -> ModelConfig:
    """c<d_model>x<layers>: the base's vocabulary, head size, QK-norm and context length, fewer/narrower layers."""
    match = re.fullmatch(r"c(\d+)x(\d+)", spec)
    if not match:
        raise UserError(f"auxiliary spec {spec!r} is not valid; valid: {VALID}")
    d_model, layers = int(match[1]), int(match[2])
    if d_model <= 0 or layers <= 0 or d_model % base.head_dim:
        raise UserError(f"auxiliary spec {spec!r}: d_model={d_model} must be a positive multiple of the base's "
                        f"head_dim={base.head_dim} and layers={layers} positive")
    heads = d_model // base.head_dim
    kv_heads = heads if heads % base.num_query_groups else heads // base.num_query_groups
    return base.replace(d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, d_ff=0,
                        head_dim=base.head_dim)


def pretrained_config(workdir: Path, spec: str) -> ModelConfig:
    """The model config of a finished lm_core run (its config.json)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"auxiliary spec {spec!r}: {path} does not exist; valid: c:<workdir of an lm_core "
                        "training run, e.g. python -m experiments.train_lm>")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())["model"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"auxiliary spec {spec!r}: {path} holds no model config ({error})") from None


def resolve_spec(base: ModelConfig, spec: str) -> AuxSpec:
    """The auxiliary model `spec` describes for `base`, validated (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"auxiliary spec {spec!r} is not valid; valid: {VALID}")
    body, explicit_map = spec, None
    if "@" in spec and re.fullmatch(r"[-0-9, ]+", spec.rsplit("@", 1)[1]):
        body, map_text = spec.rsplit("@", 1)
        explicit_map = _parse_layer_map(map_text, spec)
    fraction = pretrained = None
    if body.startswith("lp"):
        fraction = keep_fraction(body)
        config = layer_pruned_config(base, fraction)
        default_map = layer_pruned_layer_map(base.num_layers, fraction)
        name = body
    elif body.startswith("c:"):
        pretrained = Path(body[2:]).expanduser().absolute()
        config = pretrained_config(pretrained, spec)
        default_map = None
        name = f"c-{pretrained.name}"
    else:
        config = canonical_config(base, body)
        default_map = None
        name = body
    validate_pair(base, config)
    if default_map is None:
        default_map = default_layer_map(base.num_layers, config.num_layers)
    layer_map = validate_layer_map(explicit_map if explicit_map is not None else default_map, base.num_layers,
                                   config.num_layers)
    if explicit_map is not None:
        name += "@" + ",".join(map(str, layer_map))
    return AuxSpec(spec, name, config, layer_map, fraction, pretrained)


def build_kvp_model(base_config: ModelConfig, aux: AuxSpec | str, seed: int) -> KVPModel:
    """A KVPModel with a freshly initialised base (weights are loaded later) and the auxiliary `aux`."""
    aux = aux if isinstance(aux, AuxSpec) else resolve_spec(base_config, aux)
    rngs = nnx.Rngs(seed)
    base = Transformer(base_config, rngs=rngs)
    if aux.layer_pruned:
        model = KVPModel.layer_pruned(base, aux.keep_fraction, rngs=rngs)
        if aux.layer_map != model.predictor.layer_map:
            model = KVPModel(base, model.aux, rngs=rngs, layer_map=aux.layer_map)
        return model
    return KVPModel(base, Transformer(aux.config, rngs=rngs), rngs=rngs, layer_map=aux.layer_map)
