"""vocab_scaling's formulas against hand arithmetic: unigram-normalised loss, BPC, f(V), FLOPs, width table."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_core.errors import UserError
from vocab_scaling import flops, tokenization_curve, unigram_loss
from vocab_scaling.tokenization_curve import PAPER_F, FCurve


def test_unigram_distribution_counts_unseen_ids_once():
    # ids 0,0,1,3 over V=5: counts [2, 1, 0, 1, 0] -> unseen ids 2 and 4 count 1 -> [2, 1, 1, 1, 1] / 6
    p = unigram_loss.unigram_distribution([np.array([0, 0]), np.array([1, 3])], 5)
    np.testing.assert_allclose(p, np.array([2, 1, 1, 1, 1]) / 6)
    # the same from a counts array, and from one array of ids
    np.testing.assert_allclose(unigram_loss.unigram_distribution(np.array([2, 1, 0, 1, 0]), 5, counts=True), p)
    np.testing.assert_allclose(unigram_loss.unigram_distribution(np.array([0, 0, 1, 3]), 5), p)


@pytest.mark.parametrize("call", [
    lambda: unigram_loss.unigram_distribution(np.array([0, 7]), 5),  # id out of range
    lambda: unigram_loss.unigram_distribution(np.array([1, 2]), 5, counts=True),  # counts of the wrong shape
    lambda: unigram_loss.unigram_distribution(np.array([1]), 0),
])
def test_unigram_distribution_rejects_bad_input(call):
    with pytest.raises(UserError):
        call()


def test_unigram_normalized_loss_by_hand():
    log_p = np.log([0.5, 0.25, 0.25])
    # (1 + ln 0.5 + 2 + ln 0.25) / 2 = (0.306853 + 0.613706) / 2
    assert unigram_loss.unigram_normalized_loss([1.0, 2.0], [0, 1], log_p) == pytest.approx(0.4602795, abs=1e-6)
    # a model better than the unigram model has L_u < 0: 0.1 + ln 0.25 = -1.286294
    assert unigram_loss.unigram_normalized_loss([0.1], [2], log_p) == pytest.approx(-1.2862944, abs=1e-6)


def test_unigram_sums_is_masked_and_jittable():
    log_p = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    nll = jnp.array([[1.0, 2.0, 9.0]])  # [batch=1, seq=3]; the last token is padding
    targets = jnp.array([[0, 1, 2]])
    mask = jnp.array([[1, 1, 0]])
    sums = jax.jit(unigram_loss.unigram_sums)(nll, targets, mask, log_p)
    assert set(sums) == {"unigram_nll"}
    # (1 + ln 0.5) + (2 + ln 0.25) = 0.920559; mean over Σ mask = 2 tokens = 0.4602795 as above
    assert float(sums["unigram_nll"]) == pytest.approx(0.920559, abs=1e-5)


def test_bits_per_character_by_hand():
    # 100 nats over 50 characters: 2 nats/char = 2 / ln 2 bits/char
    assert unigram_loss.bits_per_character(100.0, 50) == pytest.approx(2.8853901, abs=1e-6)
    with pytest.raises(UserError):
        unigram_loss.bits_per_character(1.0, 0)


def test_paper_f_by_hand():
    # ln 32000 = 10.3734912; 0.00639222 * 107.609319 - 0.15811069 * 10.3734912 + 1.20470122 = 0.2524038
    assert PAPER_F(32000) == pytest.approx(0.2524038, abs=1e-6)
    np.testing.assert_allclose(PAPER_F(np.array([4096, 32000])), [0.3318207, 0.2524038], atol=1e-6)


def test_f_caps_vocabulary_at_200k():
    assert PAPER_F(300_000) == PAPER_F(200_000) < PAPER_F(100_000)
    assert PAPER_F.derivative(300_000) == 0.0
    # below the cap: (2a ln V + b) / V = (2 * 0.00639222 * 10.3734912 - 0.15811069) / 32000
    assert PAPER_F.derivative(32000) == pytest.approx((2 * 0.00639222 * 10.3734912 - 0.15811069) / 32000, rel=1e-6)


def test_fit_tokens_per_char_recovers_a_known_curve():
    vocab = [4096, 8192, 16384, 32768, 65536, 131072]
    curve = tokenization_curve.fit_tokens_per_char(vocab, PAPER_F(np.array(vocab)))
    np.testing.assert_allclose([curve.a, curve.b, curve.c], [PAPER_F.a, PAPER_F.b, PAPER_F.c], rtol=1e-8)
    with pytest.raises(UserError, match="at least 3 distinct"):
        tokenization_curve.fit_tokens_per_char([4096, 4096, 8192], [0.3, 0.3, 0.29])


def test_measure_tokens_per_char_and_plot(tmp_path):
    class Words:
        def encode(self, text: str) -> list[int]:
            return [len(word) for word in text.split()]

    # "a bb c" (3 tokens, 6 chars) + "dddd" (1 token, 4 chars): 4 tokens / 10 chars
    assert tokenization_curve.measure_tokens_per_char(Words(), ["a bb c", "dddd"]) == pytest.approx(0.4)
    with pytest.raises(UserError):
        tokenization_curve.measure_tokens_per_char(Words(), [""])
    path = tokenization_curve.plot_tokens_per_char(tmp_path / "f.png", [4096, 16384, 65536],
                                                   [0.33, 0.29, 0.24], FCurve(0.006, -0.15, 1.2))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("n_nv", "width"), [
    (33e6, 512), (50e6, 512), (50e6 + 1, 768), (302e6, 1024), (2.87e9, 3200), (3e9, 3200), (7e9, 4096),
    (13e9, 5120), (30e9, 6048), (70e9, 8192), (130e9, 12288), (300e9, 16384), (1000e9, 20480), (2e12, 24576),
])
def test_width_table(n_nv, width):
    assert flops.width_for(n_nv) == width


def test_paper_flops_by_hand():
    # 6 * (1e9 + 32000 * 2048) * 1e12 chars * f(32000) = 6 * 1.065536e9 * 1e12 * 0.2524038
    assert flops.paper_flops(1e9, 32000, 2048, 1e12) == pytest.approx(6 * 1.065536e21 * 0.2524038, rel=1e-6)
    assert flops.tokens_from_chars(1e12, 32000) == pytest.approx(0.2524038e12, rel=1e-6)
    assert flops.chars_from_tokens(flops.tokens_from_chars(1e12, 32000), 32000) == pytest.approx(1e12)
    # a larger V costs more per token but needs fewer tokens for the same text
    assert flops.tokens_from_chars(1e12, 64000) < flops.tokens_from_chars(1e12, 32000)
    assert math.isclose(flops.paper_flops(0, 1000, 1, 1), 6 * 1000 * PAPER_F(1000))
