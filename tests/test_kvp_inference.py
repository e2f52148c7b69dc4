"""KV prediction: the serving paths (the TTFT path: aux reads the prompt, base generates) and their FLOPs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kv_prediction.cost import predictor_flops_per_token, ttft_flops
from kv_prediction.model import KVPModel
from kv_prediction.serving import GivenKVPath, KVPPath, PlainPath, first_token, generate, padded_prompts, read_prompt
from lm_core import generation
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig, prefill
from lm_core.model import Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42], [9, 8, 7, 6]]
SAMPLING = SamplingConfig(max_new_tokens=5)


@pytest.fixture(scope="module")
def base() -> Transformer:
    config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                         max_seq_len=32, qk_norm=True)
    return Transformer(config, rngs=nnx.Rngs(3))


def true_prompt_kv(base: Transformer, tokens, positions, segment_ids):
    """The base's own K,V of every prompt token but the last: what a perfect predictor would produce."""
    return base(tokens[:, :-1], positions=positions[:, :-1], segment_ids=segment_ids[:, :-1], return_kv=True).kv


def test_perfect_prediction_reproduces_base_generation(base):
    tokens, positions, segment_ids = padded_prompts(PROMPTS)
    kv = true_prompt_kv(base, tokens, positions, segment_ids)
    expected = generation.generate(base, PROMPTS, SAMPLING)  # lm_core's own plain generation
    np.testing.assert_array_equal(generate(GivenKVPath(base, kv), PROMPTS, SAMPLING), expected)
    np.testing.assert_array_equal(generate(PlainPath(base), PROMPTS, SAMPLING), expected)


def test_perfect_prediction_gives_the_base_first_token(base):
    tokens, positions, segment_ids = padded_prompts(PROMPTS)
    kv = true_prompt_kv(base, tokens, positions, segment_ids)
    first_logits, cache = read_prompt(*nnx.split(GivenKVPath(base, kv)), tokens, positions, segment_ids,
                                      cache_len=12)
    base_logits, base_cache = prefill(*nnx.split(base), tokens, positions, segment_ids, 12)
    np.testing.assert_allclose(first_logits, base_logits, atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(first_logits, -1), jnp.argmax(base_logits, -1))
    assert int(cache.index) == int(base_cache.index) == tokens.shape[1]
    np.testing.assert_allclose(cache.layers[1].keys, base_cache.layers[1].keys, atol=1e-5)


def test_one_token_prompts_get_a_padding_column():
    # The aux then reads one padding column (segment 0, never attended) instead of an empty array.
    tokens, positions, segment_ids = padded_prompts([[1], [2]])
    np.testing.assert_array_equal(tokens, [[0, 1], [0, 2]])
    np.testing.assert_array_equal(positions, [[0, 0], [0, 0]])
    np.testing.assert_array_equal(segment_ids, [[0, 1], [0, 1]])


def test_kvp_generation_rows_are_independent(base):
    model = KVPModel.layer_pruned(base, 0.5, rngs=nnx.Rngs(0))
    together = generate(KVPPath(model), PROMPTS, SAMPLING)
    assert together.shape == (4, 5) and together.min() >= 0 and together.max() < 64
    alone = generate(KVPPath(model), PROMPTS[1:2], SAMPLING)  # 5 padding columns in the batch change nothing
    np.testing.assert_array_equal(alone[0], together[1])
    with pytest.raises(UserError, match="max_seq_len=32"):
        generate(KVPPath(model), [[1] * 30], SAMPLING)


def test_first_token_is_the_first_generated_token_on_every_path(base):
    # the compiled function TTFT is timed on computes what generation starts with
    model = KVPModel.layer_pruned(base, 0.5, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(4, 64, (3, 9)).astype(np.int32)
    for path in (PlainPath(base), KVPPath(model)):
        token, cache = first_token(*nnx.split(path), prompts, 9 + 5)
        np.testing.assert_array_equal(token, generate(path, prompts.tolist(), SAMPLING)[:, 0])
        assert int(cache.index) == 9


def test_ttft_flops_by_hand():
    # base: 2 layers, d=8, H=2, KV=1, hd=4, ff=16, V=16; per token (lm_core.flops conventions):
    #   projections 2·2·8·4·(2·2+2·1) = 768, FFN 2·2·3·8·16 = 1536, output 2·8·16 = 256, scores 4·2·2·4 = 64 per key
    base = ModelConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, d_ff=16)
    aux = base.replace(num_layers=1)
    flops = ttft_flops(base, aux, prompt_len=4)
    assert flops.base_only == 4 * (768 + 1536 + 64 * 2.5) + 256  # causal: (4+1)/2 keys on average
    assert flops.base_last_token == 768 + 1536 + 256 + 64 * 4  # one query, all 4 keys
    assert flops.auxiliary == 3 * (384 + 768 + 32 * 2)  # 3 tokens, half the layers, no output layer
    assert predictor_flops_per_token(base, aux) == 2 * 2 * 2 * 4 * 4  # 2 layers x (K, V) x 2·4·4
    assert flops.predictor == 3 * 128
    assert flops.kvp == flops.auxiliary + flops.predictor + flops.base_last_token
    assert flops.reduction == pytest.approx(10112 / 6848)
    # Long prompts: the reduction approaches t_B(1) / t_A(1) (here 2 without output layers and attention).
    long = ttft_flops(base.replace(vocab_size=2), aux.replace(vocab_size=2), prompt_len=1000)
    assert 1.8 < long.reduction < 2.0
    with pytest.raises(UserError, match="prompt_len=0"):
        ttft_flops(base, aux, 0)
