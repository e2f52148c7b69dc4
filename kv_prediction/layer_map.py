"""Which auxiliary layer's K,V predicts each base layer's K,V: a fixed monotone list, one entry per base layer.

The paper's lists (apple/corenet `projects/kv-prediction` configs) come in two shapes:
- canonical aux (KVP-C): the FIRST base layers share aux layers pairwise, the rest map one-to-one, e.g.
  28 base <- 20 aux: [0,0,1,1,...,7,7,8,9,...,19] and 28 <- 16: [0,0,...,11,11,12,13,14,15]. Generally every aux
  layer is used n_base // n_aux times and the first n_base % n_aux of them once more (`default_layer_map`).
- layer-pruned aux (KVP-LP): each base layer reads the aux copy of the nearest KEPT base layer at or before it,
  e.g. LP-0.75 of 28 layers: [0,1,2,2,3,4,5,5,...] (`layer_pruned_layer_map`). For LP-0.50 / LP-0.25 this is the
  same list as `default_layer_map` (each aux layer used 2 / 4 times).
"""

from __future__ import annotations

from collections.abc import Sequence

from kv_prediction.auxiliary import layer_pruned_indices
from lm_core.errors import UserError


def default_layer_map(n_base: int, n_aux: int) -> list[int]:
    """Monotone map of length n_base onto [0, n_aux); earlier aux layers absorb the surplus base layers."""
    if not isinstance(n_aux, int) or not isinstance(n_base, int) or not 1 <= n_aux <= n_base:
        raise UserError(f"cannot map n_base={n_base} base layers onto n_aux={n_aux} auxiliary layers; "
                        f"valid: 1 <= n_aux <= n_base")
    repeats, extra = divmod(n_base, n_aux)
    return [aux for aux in range(n_aux) for _ in range(repeats + (1 if aux < extra else 0))]


def layer_pruned_layer_map(num_layers: int, keep_fraction: float) -> list[int]:
    """Base layer i <- the aux layer copied from the last kept base layer <= i (the corenet LP lists)."""
    kept = layer_pruned_indices(num_layers, keep_fraction)
    return [sum(1 for k in kept if k <= i) - 1 for i in range(num_layers)]


def validate_layer_map(layer_map: Sequence[int], n_base: int, n_aux: int) -> tuple[int, ...]:
    """The map as a tuple of ints, or a UserError saying what is wrong with it (length, range, order)."""
    layer_map = tuple(layer_map)
    if len(layer_map) != n_base:
        raise UserError(f"layer_map has {len(layer_map)} entries; it needs one per base layer ({n_base})")
    bad = [j for j in layer_map if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < n_aux]
    if bad:
        raise UserError(f"layer_map entries {bad} are not auxiliary layer indices; valid: integers in "
                        f"[0, {n_aux})")
    drops = [i for i in range(1, n_base) if layer_map[i] < layer_map[i - 1]]
    if drops:
        i = drops[0]
        raise UserError(f"layer_map must be non-decreasing, but base layer {i} maps to aux layer {layer_map[i]} "
                        f"after base layer {i - 1} mapped to {layer_map[i - 1]}")
    return layer_map
