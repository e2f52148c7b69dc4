import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.errors import UserError
from lm_core.generation import SamplingConfig, generate, left_pad, sample_token
from lm_core.model import Transformer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_config(num_kv_heads=2, qk_norm=True), rngs=nnx.Rngs(3))


def greedy_by_full_forward(model, prompt, generated):
    """What greedy decoding must produce, by teacher forcing: one full forward over prompt + generated tokens,
    whose argmax at each position must be the next generated token."""
    sequence = jnp.array([list(prompt) + list(generated)])
    logits = model(sequence).logits[0, len(prompt) - 1:-1]
    return [int(t) for t in jnp.argmax(logits, axis=-1)]


def test_greedy_generation_matches_full_forward_for_ragged_batch(model):
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [100]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=5))
    assert out.shape == (3, 5)
    for prompt, row in zip(prompts, out, strict=True):
        assert list(row) == greedy_by_full_forward(model, prompt, row)


def test_left_pad_layout():
    tokens, positions, segments = left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda cfg: np.array([int(sample_token(logits, k, cfg)[0]) for k in keys])
    assert set(draw(SamplingConfig(temperature=1.0, top_k=1))) == {0}
    assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.4))) == {0}
    assert set(draw(SamplingConfig(temperature=1.0))) == {0, 1, 2, 3}
    assert int(sample_token(logits, keys[0], SamplingConfig())[0]) == 0


def test_eos_stops_a_row(model):
    prompt = [[5, 6, 7]]
    first = int(generate(model, prompt, SamplingConfig(max_new_tokens=1))[0, 0])
    out = generate(model, prompt, SamplingConfig(max_new_tokens=4, eos_id=first, pad_id=0))
    assert list(out[0]) == [first, 0, 0, 0]


def test_bad_requests(model):
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, [[1] * 60], SamplingConfig(max_new_tokens=10))
    with pytest.raises(UserError, match="top_p"):
        SamplingConfig(top_p=0.0)
