import pytest
import torch

import effnet
from effnet import FEATURE_STRIDES, VARIANTS, build


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_declared_and_torchvision(name: str) -> None:
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == VARIANTS[name].num_params


def test_forward_shapes_at_any_size() -> None:
    model = build("efficientnet_b0", num_classes=10).eval()
    for size in (32, 57, 128):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert model(x).shape == (2, 10)
            assert model.forward_features(x).shape == (2, 1280, -(-size // 32), -(-size // 32))


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_feature_maps_form_a_pyramid(padding: str) -> None:
    model = build("efficientnet_b3", padding=padding).eval()
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, 3, 128, 96))
    assert list(maps) == list(FEATURE_STRIDES)
    for stride, fmap in maps.items():
        assert fmap.shape == (1, model.feature_channels[stride], 128 // stride, 96 // stride)
    assert model.feature_channels == {4: 32, 8: 48, 16: 136, 32: 384}


def test_stochastic_depth_grows_linearly_over_all_blocks() -> None:
    model = build("efficientnet_b0", drop_path_rate=0.2)
    rates = [block.drop_path_rate for stage in model.stages for block in stage]
    assert len(rates) == 16
    assert rates[0] == 0.0
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_train_mode_is_stochastic_eval_is_deterministic() -> None:
    model = build("efficientnet_b0", num_classes=4)
    torch.nn.init.normal_(model.classifier.weight)  # a fresh head is zero: it would hide what the body does
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_build_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="valid: efficientnet_b0"):
        build("efficientnet_b8")
    with pytest.raises(ValueError, match=r"unknown option\(s\) width_mult.*valid: .*num_classes"):
        build("efficientnet_b0", width_mult=2.0)


def test_freeze_through_stage_stops_gradients_and_bn_updates() -> None:
    model = build("efficientnet_b0", num_classes=3)
    model.freeze(through_stage=2)
    model.train()
    frozen_bn = model.stages[2][0].project.bn
    before = frozen_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(frozen_bn.running_mean, before)
    assert model.stem.conv.weight.grad is None
    assert model.stages[2][0].depthwise.conv.weight.grad is None
    assert model.stages[3][0].depthwise.conv.weight.grad is not None
    assert model.classifier.weight.grad is not None
    with pytest.raises(ValueError, match="through_stage"):
        model.freeze(through_stage=7)


def test_reset_classifier_gives_new_head() -> None:
    model = build("efficientnet_b0")
    model.reset_classifier(5)
    assert model.spec.num_classes == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_public_api() -> None:
    assert set(effnet.__all__) >= {"build", "EfficientNet", "EfficientNetSpec", "VARIANTS"}
