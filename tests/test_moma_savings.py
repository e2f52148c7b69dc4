import pytest

from lm_core.errors import UserError
from moma.savings import flops_savings, flops_to_reach


def test_flops_to_reach_interpolates_in_log_flops():
    # loss 3.0 at 1e9 and 2.0 at 1e11: 2.5 is reached half-way in log C, at 1e10
    assert flops_to_reach([1e9, 1e11], [3.0, 2.0], 2.5) == pytest.approx(1e10)
    assert flops_to_reach([1e9, 1e11], [3.0, 2.0], 3.5) == 1e9  # already below at the first point
    assert flops_to_reach([1e9, 1e11], [3.0, 2.0], 1.0) is None  # never reached


def test_savings_by_hand():
    dense = ([1e9, 1e10, 1e11], [4.0, 3.0, 2.5])
    # the sparse model reaches the dense final loss 2.5 half-way (in loss) between 1e10 and 1e11, i.e. at 10^10.5
    sparse = ([1e9, 1e10, 1e11], [3.5, 2.75, 2.25])
    assert flops_savings(*dense, *sparse) == pytest.approx(1e11 / 10**10.5)
    assert flops_savings(*dense, *dense) == pytest.approx(1.0)
    assert flops_savings(*dense, [1e9], [5.0]) is None  # never reaches the target: no savings figure


def test_bad_curves():
    with pytest.raises(UserError, match="matching, finite, positive"):
        flops_to_reach([1e9, -1], [3.0, 2.0], 2.5)


def test_the_noise_bar_is_the_larger_eta_between_two_dense_seeds_either_way_round():
    from experiments.moma.savings import noise_from_seeds

    flops = [1e9, 1e10, 1e11]
    first = {"overall": (flops, [4.0, 3.0, 2.5]), "text": (flops, [2.0, 1.5, 1.0])}
    # the second seed ends lower overall: it reaches 2.5 half-way (in loss) between 1e10 and 1e11 -> η 10^0.5;
    # first never reaches its 2.4, so only that way round counts. Text: identical curves, η 1 both ways.
    second = {"overall": (flops, [4.0, 3.0, 2.0]), "text": (flops, [2.0, 1.5, 1.0])}
    noise = noise_from_seeds(first, [second])
    assert noise["eta"] == pytest.approx(10**0.5 - 1) and noise["eta_text"] == pytest.approx(0.0)
    assert noise["eta_image"] == 0.0  # no image curves: no bar
    assert noise_from_seeds(second, [first])["eta"] == pytest.approx(10**0.5 - 1)  # symmetric
