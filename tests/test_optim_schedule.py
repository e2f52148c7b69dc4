"""lm_core.optim's learning-rate schedules by hand, and the decay choice flowing from a config to OptimizerConfig."""

import math

import pytest

from lm_core.errors import UserError
from lm_core.optim import OptimizerConfig, learning_rate_schedule
from lm_core.run_config import default_config, optimizer_config_from

PEAK = 1e-3


def test_linear_decay_by_hand():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=PEAK, warmup_steps=10, total_steps=110,
                                                      final_lr_fraction=0.01, decay="linear"))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(PEAK / 2)  # half-way up the warmup
    assert float(schedule(10)) == pytest.approx(PEAK)  # warmup end = peak
    # 100 decay steps from the peak to 1% of it: a straight line, so the midpoint is the mean of its ends
    assert float(schedule(60)) == pytest.approx((PEAK + 0.01 * PEAK) / 2)
    assert float(schedule(35)) == pytest.approx(PEAK - 0.25 * 0.99 * PEAK)
    assert float(schedule(110)) == pytest.approx(0.01 * PEAK)
    assert float(schedule(500)) == pytest.approx(0.01 * PEAK)  # stays at the end value past total_steps


def test_linear_decay_without_warmup_starts_at_the_peak():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=PEAK, warmup_steps=0, total_steps=100,
                                                      final_lr_fraction=0.0, decay="linear"))
    assert [float(schedule(step)) for step in (0, 50, 100)] == pytest.approx([PEAK, PEAK / 2, 0.0])


def test_cosine_stays_the_default_by_hand():
    config = OptimizerConfig(learning_rate=PEAK, warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    assert config.decay == "cosine"
    schedule = learning_rate_schedule(config)
    assert float(schedule(10)) == pytest.approx(PEAK)
    # a quarter into the decay: end + (peak - end) * (1 + cos(pi / 4)) / 2
    assert float(schedule(35)) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * (1 + math.cos(math.pi / 4)) / 2)
    assert float(schedule(110)) == pytest.approx(0.1 * PEAK)


def test_bad_decay_is_one_line_user_error():
    with pytest.raises(UserError, match=r"^decay='step' is unknown; valid: \['cosine', 'linear'\]$"):
        OptimizerConfig(decay="step")


def test_decay_is_a_config_field_and_moma_configs_decay_linearly_to_one_percent():
    from experiments.configs import moma_paper, moma_tiny

    config = default_config()
    assert config.optimizer.decay == "cosine"  # a field, so --config.optimizer.decay=linear overrides it
    config.optimizer.decay = "linear"
    assert optimizer_config_from(config).decay == "linear"
    for moma_config in (moma_tiny.get_config("moe_4t4i"), moma_paper.get_config("90m,moe_4t4i")):
        optimizer = optimizer_config_from(moma_config)
        assert (optimizer.decay, optimizer.final_lr_fraction) == ("linear", 0.01)
