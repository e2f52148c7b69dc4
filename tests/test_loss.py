"""Loss helpers: hand values, and the chunked large-vocabulary path equals the plain one (value and gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_core.loss import chunked_cross_entropy, cross_entropy


def test_cross_entropy_hand_values():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # normalised, so log Z = 0
    loss, metrics = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]), z_loss_weight=0.5)
    assert float(metrics["loss"]) == pytest.approx(math.log(2))  # only the first token counts
    assert float(metrics["z_loss"]) == pytest.approx(0.0, abs=1e-12)
    shifted, shifted_metrics = cross_entropy(logits + 1.0, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]), 0.5)
    assert float(shifted_metrics["z_loss"]) == pytest.approx(1.0)  # log Z = 1 -> z-loss 1
    assert float(shifted) == pytest.approx(math.log(2) + 0.5)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (3, 10, 8))
    weights = jax.random.normal(keys[1], (8, 50))
    targets = jax.random.randint(keys[2], (3, 10), 0, 50)
    mask = (jax.random.uniform(keys[3], (3, 10)) > 0.2).astype(jnp.float32)

    def full(h, w):
        return cross_entropy(jnp.einsum("bsd,dv->bsv", h, w), targets, mask, 1e-2)[0]

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, 1e-2, chunk_tokens=chunk)[0]

    np.testing.assert_allclose(chunked(hidden, weights), full(hidden, weights), rtol=1e-6)
    for a, b in zip(jax.grad(chunked, argnums=(0, 1))(hidden, weights),
                    jax.grad(full, argnums=(0, 1))(hidden, weights), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_next_token_loss_chunked_equals_plain():
    from flax import nnx

    from lm_core.loss import next_token_loss
    from lm_core.model import Transformer
    from tests.helpers import random_batch, tiny_config

    batch = {k: jnp.asarray(v) for k, v in random_batch(0, batch=2, seq=8, packed=True).items()}
    for tied in (True, False):
        model = Transformer(tiny_config(tie_embeddings=tied), rngs=nnx.Rngs(0))
        plain, _ = next_token_loss(model, batch, z_loss_weight=1e-3)
        chunked, metrics = next_token_loss(model, batch, z_loss_weight=1e-3, chunk_tokens=5)
        np.testing.assert_allclose(chunked, plain, rtol=1e-6)
        assert float(metrics["tokens"]) == float(jnp.sum(batch["loss_mask"]))


def test_group_losses_by_hand_and_chunked():
    # Two tokens, vocab 2: logits (0, 0) and (ln 3, 0). Targets 0 and 1: NLLs ln 2 and ln 4.
    from lm_core.loss import output_layer_loss

    class Linear:  # the two model methods output_layer_loss uses
        def logits(self, hidden):
            return hidden @ self.output_matrix()

        def output_matrix(self):
            return jnp.eye(2)

    hidden = jnp.array([[[0.0, 0.0], [math.log(3), 0.0]]])
    targets, mask = jnp.array([[0, 1]]), jnp.ones((1, 2))
    groups = {"first": jnp.array([[1.0, 0.0]]), "second": jnp.array([[0.0, 1.0]])}
    for chunk in (0, 1, 2):
        loss, metrics = output_layer_loss(Linear(), hidden, targets, mask, 0.0, chunk, groups)
        assert float(metrics["first_loss"]) == pytest.approx(math.log(2), rel=1e-6)
        assert float(metrics["second_loss"]) == pytest.approx(math.log(4), rel=1e-6)
        assert float(loss) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
