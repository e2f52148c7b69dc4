"""KV prediction: layer maps, layer pruning and (base, aux) validation, against the paper's lists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kv_prediction.auxiliary import build_layer_pruned, layer_pruned_config, layer_pruned_indices, validate_pair
from kv_prediction.layer_map import default_layer_map, layer_pruned_layer_map, validate_layer_map
from kv_prediction.model import KVPModel
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.model import Transformer


def small(**changes) -> ModelConfig:
    values = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32)
    return ModelConfig(**{**values, **changes})


# The apple/corenet projects/kv-prediction configs for OpenELM-1.1B (28 layers).
COREMAP_450M = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
COREMAP_270M = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 13, 14, 15]
COREMAP_LP_075 = [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16, 17, 17, 18, 19, 20, 20]


def test_default_layer_map_matches_paper_lists():
    assert default_layer_map(28, 20) == COREMAP_450M
    assert default_layer_map(28, 16) == COREMAP_270M
    assert default_layer_map(28, 14) == [j for j in range(14) for _ in range(2)]  # LP-0.50: each aux layer twice
    assert default_layer_map(28, 7) == [j for j in range(7) for _ in range(4)]
    assert default_layer_map(4, 4) == [0, 1, 2, 3]
    assert default_layer_map(5, 2) == [0, 0, 0, 1, 1]
    with pytest.raises(UserError, match="n_aux=5"):
        default_layer_map(4, 5)


def test_layer_pruned_indices_and_maps():
    assert layer_pruned_indices(28, 0.75) == [i for i in range(28) if i % 4 != 3]  # the OpenELM-1.1B-0.75l list
    assert layer_pruned_indices(28, 0.5) == list(range(0, 28, 2))
    assert layer_pruned_indices(28, 0.25) == list(range(0, 28, 4))
    assert layer_pruned_indices(36, 0.25) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert layer_pruned_layer_map(28, 0.75) == COREMAP_LP_075
    assert layer_pruned_layer_map(28, 0.5) == default_layer_map(28, 14)
    assert layer_pruned_layer_map(28, 0.25) == default_layer_map(28, 7)
    assert layer_pruned_config(small(), 0.5).num_layers == 2
    for bad in (0.0, 1.0, 1.5, "half"):
        with pytest.raises(UserError, match="keep_fraction"):
            layer_pruned_indices(8, bad)
    with pytest.raises(UserError, match="keeps 0 layers"):
        layer_pruned_indices(4, 0.1)


@pytest.mark.parametrize("layer_map, message", [
    ([0, 0, 1], "3 entries; it needs one per base layer \\(4\\)"),
    ([0, 1, 2, 2], "entries \\[2, 2\\] are not auxiliary layer indices"),
    ([0, -1, 1, 1], "entries \\[-1\\]"),
    ([0, 1, 0, 1], "non-decreasing, but base layer 2 maps to aux layer 0"),
])
def test_validate_layer_map_errors(layer_map, message):
    with pytest.raises(UserError, match=message) as error:
        validate_layer_map(layer_map, 4, 2)
    assert "\n" not in str(error.value)
    assert validate_layer_map([0, 0, 1, 1], 4, 2) == (0, 0, 1, 1)


@pytest.mark.parametrize("tie,scan", [(True, False), (False, False), (False, True)])
def test_build_layer_pruned_copies_kept_layers(tie, scan):
    base = Transformer(small(tie_embeddings=tie, qk_norm=True, scan_layers=scan), rngs=nnx.Rngs(0))
    aux = build_layer_pruned(base, 0.5, nnx.Rngs(5))
    assert aux.config.num_layers == 2 and aux.config.scan_layers == scan
    pairs = [(aux.embedding, base.embedding), (aux.final_norm, base.final_norm),
             (aux.block(0), base.block(0)), (aux.block(1), base.block(2))]
    for aux_part, base_part in pairs:
        aux_leaves, base_leaves = jax.tree.leaves(nnx.state(aux_part)), jax.tree.leaves(nnx.state(base_part))
        for a, b in zip(aux_leaves, base_leaves, strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # copies, not shared arrays
    if not tie:
        np.testing.assert_array_equal(aux.output[...], base.output[...])
    # The aux's first layer is the base's first layer, so their layer-0 K,V agree exactly.
    tokens = jnp.arange(10).reshape(1, 10)
    np.testing.assert_array_equal(aux(tokens, return_kv=True).kv[0].keys, base(tokens, return_kv=True).kv[0].keys)


def test_validate_pair():
    base = small()
    validate_pair(base, small(num_layers=2))  # canonical: fewer layers
    validate_pair(base, small(d_model=16, num_heads=2, num_kv_heads=1))  # canonical: narrower, same depth
    cases = [
        (small(vocab_size=128), "vocab_size=128 differs from the base's vocab_size=64"),
        (small(num_layers=5, d_model=16, num_heads=2), "num_layers=5 exceeds the base's num_layers=4"),
        (small(num_layers=2, d_model=128), "is not smaller than the base"),
        (base, "is not smaller than the base"),
    ]
    for aux, message in cases:
        with pytest.raises(UserError, match=message) as error:
            validate_pair(base, aux)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("aux_changes, layer_map, message", [
    (dict(), None, "is not smaller than the base"),
    (dict(num_layers=2, vocab_size=65), None, "vocab_size=65 differs"),
    (dict(num_layers=2), [0, 1, 1], "3 entries"),
    (dict(num_layers=2), [0, 1, 0, 1], "non-decreasing"),
])
def test_kvp_model_rejects_bad_setups(aux_changes, layer_map, message):
    def build() -> KVPModel:
        return KVPModel(Transformer(small(), rngs=nnx.Rngs(0)), Transformer(small(**aux_changes), rngs=nnx.Rngs(1)),
                        rngs=nnx.Rngs(2), layer_map=layer_map)

    with pytest.raises(UserError, match=message):
        nnx.eval_shape(build)  # shapes only: the checks run before any weight is needed
