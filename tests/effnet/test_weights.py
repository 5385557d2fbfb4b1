"""Parity with the reference implementations: same weights in, same logits out."""

from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision

from effnet import VARIANTS, build
from effnet.weights import (
    NumClassesMismatchError,
    WeightsMismatchError,
    is_compound_checkpoint,
    load_checkpoint,
    load_reference_weights,
    load_weights,
    save_checkpoint,
)
from tests.effnet.helpers import as_if_trained, assert_close_relative, with_realistic_bn_stats

OTHER_SIZE = 97  # odd on purpose: exercises padding at every stride


def _assert_same_logits(ours: torch.nn.Module, reference: torch.nn.Module, size: int) -> None:
    # In float64: the same computation agrees to ~1e-12, while float32 summation order alone
    # (threads, kernels) moved a B3's logits by up to 2e-4 of the largest and failed CI once.
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        assert_close_relative(ours.double().eval()(x), reference.double()(x), tol=1e-9)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torchvision_weights_give_torchvision_logits(name: str, tmp_path: Path) -> None:
    resolution = VARIANTS[name].resolution
    reference = with_realistic_bn_stats(getattr(torchvision.models, name)(), resolution)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    ours = load_reference_weights(build(name), tmp_path / "tv.pth")
    _assert_same_logits(ours, reference, resolution)
    _assert_same_logits(ours, reference, OTHER_SIZE)


def test_training_step_gives_torchvision_loss_gradients_and_statistics(tmp_path: Path) -> None:
    reference = torchvision.models.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.0).train()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    ours = load_reference_weights(build("efficientnet_b0", dropout=0.0, drop_path_rate=0.0), tmp_path / "tv.pth")
    reference, ours = reference.double(), ours.double()  # float64: see _assert_same_logits
    x, y = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(0, 1000, (4,))
    losses = []
    for model in (ours.train(), reference):
        losses.append(F.cross_entropy(model(x), y))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    # torchvision's gradients and updated BatchNorm statistics, translated to our names by the loader.
    torch.save({**reference.state_dict(), **{k: p.grad for k, p in reference.named_parameters()}}, tmp_path / "g.pth")
    expected = load_reference_weights(build("efficientnet_b0"), tmp_path / "g.pth").state_dict()
    actual = {**ours.state_dict(), **{k: p.grad for k, p in ours.named_parameters()}}
    for key, value in expected.items():
        error = (actual[key].float() - value.float()).abs().max().item()
        assert error <= 1e-5 * value.float().abs().max().item() + 1e-7, key  # + float rounding near 0


@pytest.mark.parametrize(
    ("timm_name", "name", "options"),
    [
        ("efficientnet_b0", "efficientnet_b0", {}),
        ("efficientnet_b2", "efficientnet_b2", {}),
        ("tf_efficientnet_b0", "efficientnet_b0", {"padding": "same", "bn_eps": 1e-3}),
        ("tf_efficientnet_b3", "efficientnet_b3", {"padding": "same", "bn_eps": 1e-3}),
    ],
)
def test_timm_weights_give_timm_logits(timm_name: str, name: str, options: dict, tmp_path: Path) -> None:
    reference = with_realistic_bn_stats(timm.create_model(timm_name), 128)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    ours = load_reference_weights(build(name, **options), tmp_path / "timm.pth")
    _assert_same_logits(ours, reference, VARIANTS[name].resolution)
    _assert_same_logits(ours, reference, OTHER_SIZE)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(\d+\): stages\.0\.1\..*efficientnet_b0"):
        load_reference_weights(build("efficientnet_b0"), tmp_path / "b1.pth")
    torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "b0.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(\d+\): stages\.0\.1\..*efficientnet_b1"):
        load_reference_weights(build("efficientnet_b1"), tmp_path / "b0.pth")

    torch.save(torchvision.models.efficientnet_b2().state_dict(), tmp_path / "b2.pth")
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(\d+\): stages\.2\.0\.project\.conv\.weight: checkpoint \(48, .*new_head=True"):
        load_reference_weights(build("efficientnet_b0"), tmp_path / "b2.pth")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_reference_weights(build("efficientnet_b0"), tmp_path / "nope.pth")


def test_transfer_learning_keeps_the_backbone_and_a_new_head(tmp_path: Path) -> None:
    reference = torchvision.models.efficientnet_b0()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    with pytest.raises(WeightsMismatchError, match="classifier"):
        load_reference_weights(build("efficientnet_b0", num_classes=10), tmp_path / "tv.pth")
    model = load_reference_weights(build("efficientnet_b0", num_classes=10), tmp_path / "tv.pth", new_head=True)
    assert torch.equal(model.stem.conv.weight, reference.features[0][0].weight)
    assert model.classifier.out_features == 10
    model.freeze(through_stage=3)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert "stages.3" not in trainable and "stages.4" in trainable


def test_own_checkpoint_round_trip_rebuilds_the_model(tmp_path: Path) -> None:
    model = as_if_trained(build("efficientnet_b0", num_classes=7, padding="same")).eval()
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    restored = load_checkpoint(path).eval()
    assert restored.spec == model.spec
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_foreign_safetensors_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsMismatchError, match="not a compound checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


# --- load_weights: any accepted file, told apart by content --------------------------------------


def _save_torch(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path)


@pytest.mark.parametrize(
    ("filename", "save"),
    [
        ("tv.safetensors", safetensors.torch.save_file),
        ("tv.pth", safetensors.torch.save_file),  # safetensors content under a torch suffix
        ("tv.bin", _save_torch),
    ],
)
def test_reference_state_dict_in_any_container_loads_by_content(
    filename: str, save: Callable[[dict[str, torch.Tensor], Path], None], tmp_path: Path
) -> None:
    reference = torchvision.models.efficientnet_b0()
    save(reference.state_dict(), tmp_path / filename)
    assert not is_compound_checkpoint(tmp_path / filename)
    model = load_weights(tmp_path / filename, "efficientnet_b0")
    assert model.spec.num_classes == 1000
    assert torch.equal(model.stem.conv.weight, reference.features[0][0].weight)
    assert torch.equal(model.classifier.weight, reference.classifier[1].weight)


def test_compound_checkpoint_under_a_pth_name_rebuilds_its_own_model(tmp_path: Path) -> None:
    model = as_if_trained(build("efficientnet_b0", num_classes=7, padding="same")).eval()
    path = save_checkpoint(model, tmp_path / "model.safetensors").rename(tmp_path / "model.pth")
    assert is_compound_checkpoint(path)
    for num_classes in (None, 7):
        restored = load_weights(path, "efficientnet_b0", num_classes=num_classes)
        assert restored.spec == model.spec
        assert torch.equal(restored.classifier.weight, model.classifier.weight)


def test_compound_checkpoint_refuses_another_variant_or_num_classes(tmp_path: Path) -> None:
    path = save_checkpoint(as_if_trained(build("efficientnet_b0", num_classes=7)), tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match="compound checkpoint of efficientnet_b0, not efficientnet_b1"):
        load_weights(path, "efficientnet_b1")
    with pytest.raises(NumClassesMismatchError, match=r"7 classes, not the 10 asked for.*num_classes=7") as caught:
        load_weights(path, "efficientnet_b0", num_classes=10)
    assert (caught.value.in_file, caught.value.asked, caught.value.compound) == (7, 10, True)


def test_reference_state_dict_with_another_head_names_its_num_classes(tmp_path: Path) -> None:
    reference = torchvision.models.efficientnet_b0(num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "tv10.pth")
    with pytest.raises(NumClassesMismatchError, match=r"10 classes, not the 1000 asked for; pass num_classes=10"):
        load_weights(tmp_path / "tv10.pth", "efficientnet_b0")
    model = load_weights(tmp_path / "tv10.pth", "efficientnet_b0", num_classes=10)
    assert torch.equal(model.classifier.weight, reference.classifier[1].weight)


def test_files_that_are_not_weights_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_bytes(b"not weights at all")
    assert not is_compound_checkpoint(tmp_path / "notes.pth")
    with pytest.raises(ValueError, match="neither a safetensors file nor a torch.save file"):
        load_weights(tmp_path / "notes.pth", "efficientnet_b0")
    torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(WeightsMismatchError, match=r"not a compound checkpoint \(not a safetensors file\)"):
        load_checkpoint(tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="unknown EfficientNet variant 'efficientnet_b9'"):
        load_weights(tmp_path / "tv.pth", "efficientnet_b9")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(tmp_path / "nope.safetensors", "efficientnet_b0")
