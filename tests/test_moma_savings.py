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
