import dataclasses

import pytest

from effnet import VARIANTS, get_spec, round_channels, round_repeats
from effnet.specs import EfficientNetSpec


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [
        (32, 1.0, 32),
        (32, 1.1, 32),   # 35.2 rounds down to 32, which keeps >= 90 %
        (40, 1.1, 48),   # 44 rounds half up
        (16, 1.4, 24),   # 22.4 -> 24
        (320, 1.2, 384),
        (1280, 1.8, 2304),
        (4, 1.0, 8),     # never below the divisor
        (100, 0.5, 48),  # 50 -> 48, which keeps >= 90 %
        (36, 0.25, 16),  # 9 -> 8 keeps 89 %: one more divisor
    ],
)
def test_round_channels(channels: int, width: float, expected: int) -> None:
    assert round_channels(channels, width) == expected
    assert round_channels(channels, width) % 8 == 0


@pytest.mark.parametrize(("repeats", "depth", "expected"), [(1, 1.0, 1), (2, 1.1, 3), (3, 3.1, 10), (4, 2.2, 9)])
def test_round_repeats_rounds_up(repeats: int, depth: float, expected: int) -> None:
    assert round_repeats(repeats, depth) == expected


def test_variant_table_is_the_papers() -> None:
    assert list(VARIANTS) == [f"efficientnet_b{i}" for i in range(8)]
    b7 = get_spec("efficientnet_b7")
    assert (b7.width_mult, b7.depth_mult, b7.resolution, b7.dropout) == (2.0, 3.1, 600, 0.5)
    assert (b7.bn_eps, b7.bn_momentum) == (1e-3, 0.01)
    assert get_spec("efficientnet_b0").bn_eps == 1e-5


def test_unknown_variant_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown EfficientNet variant 'efficientnet_b9'.*efficientnet_b0.*efficientnet_b7"):
        get_spec("efficientnet_b9")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("num_classes", 0, "num_classes"), ("dropout", 1.5, "dropout"), ("drop_path_rate", -0.1, "drop_path_rate"),
     ("padding", "valid", "padding")],
)
def test_spec_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_spec("efficientnet_b0"), **{field: value})
    assert isinstance(get_spec("efficientnet_b0"), EfficientNetSpec)
