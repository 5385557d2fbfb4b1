"""A fresh model starts at chance: cross-entropy ln C for any variant and class count, in train and eval mode."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from effnet import VARIANTS, build
from effnet.weights import load_reference_weights

CHANCE_TOLERANCE_NATS = 0.25


def _cross_entropies(model: torch.nn.Module, num_classes: int) -> dict[str, float]:
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, num_classes, (8,))
    losses = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            losses[mode] = F.cross_entropy(model(images), labels).item()
    return losses


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_fresh_model_starts_at_chance(name: str, num_classes: int) -> None:
    losses = _cross_entropies(build(name, num_classes=num_classes), num_classes)
    for mode, loss in losses.items():
        assert abs(loss - math.log(num_classes)) <= CHANCE_TOLERANCE_NATS, (mode, loss)


def test_a_new_head_for_transfer_learning_starts_at_chance(tmp_path: Path) -> None:
    torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "tv.pth")
    model = load_reference_weights(build("efficientnet_b0", num_classes=10), tmp_path / "tv.pth", new_head=True)
    for mode, loss in _cross_entropies(model, 10).items():
        assert abs(loss - math.log(10)) <= CHANCE_TOLERANCE_NATS, (mode, loss)
    model.reset_classifier(3)
    for mode, loss in _cross_entropies(model, 3).items():
        assert abs(loss - math.log(3)) <= CHANCE_TOLERANCE_NATS, (mode, loss)


def test_every_residual_block_starts_as_the_identity() -> None:
    model = build("efficientnet_b7", num_classes=10).eval()
    blocks = [block for stage in model.stages for block in stage if block.has_residual]
    assert len(blocks) > 40
    for block in (blocks[0], blocks[-1]):
        inputs = torch.randn(2, block.project.bn.num_features, 8, 8)  # a residual block keeps its width
        with torch.no_grad():
            assert torch.equal(block(inputs.clone()), inputs)
