import pytest

from lm_core.config import ModelConfig
from lm_core.errors import UserError


def test_defaults_are_resolved():
    config = ModelConfig(d_model=96, num_heads=6)
    assert config.head_dim == 16
    assert config.num_kv_heads == 6
    assert config.d_ff == 256  # 8/3 * 96 = 256, already a multiple of 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(d_model=65, num_heads=4), "d_model=65 is not divisible by num_heads=4"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(num_layers=-2), "num_layers=-2 must be a positive integer"),
        (dict(dtype="float8"), "dtype='float8' is unknown"),
        (dict(norm_placement="post"), "norm_placement='post' is unknown"),
        (dict(head_dim=7, d_model=28, num_heads=4), "head_dim=7 must be even"),
    ],
)
def test_invalid_configs_name_the_bad_value(changes, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**changes)


def test_round_trip_and_differences():
    config = ModelConfig(num_layers=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.differing_fields(config.replace(num_layers=4, qk_norm=True)) == ["num_layers", "qk_norm"]
    with pytest.raises(UserError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"width": 3})
