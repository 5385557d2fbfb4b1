"""BatchNorm statistics recomputed for the weights as they are: evaluation sees what training saw."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cluster.train.bn_statistics import recalibrate_batchnorm
from effnet import VARIANTS, build


def _quadrant_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An easy task: the class is which quadrant of the image is bright."""
    labels = torch.randint(0, 4, (count,))
    images = torch.randn(count, 3, 32, 32) * 0.5
    for image, label in zip(images, labels.tolist(), strict=True):
        row, column = divmod(label, 2)
        image[:, row * 16:(row + 1) * 16, column * 16:(column + 1) * 16] += 2.0
    return images, labels


def test_a_short_run_evaluates_truthfully_once_its_statistics_are_recomputed() -> None:
    # B5-B7's momentum 0.01: after 30 steps the running averages still mostly hold their initial 0 and 1.
    model = build("efficientnet_b0", num_classes=4, bn_momentum=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(30):
        images, labels = _quadrant_images(16)
        loss = F.cross_entropy(model.train()(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # it learned the task

    images, labels = _quadrant_images(128)

    def accuracy() -> float:
        with torch.no_grad():
            return (model.eval()(images).argmax(dim=1) == labels).float().mean().item()

    assert accuracy() < 0.5  # judged with the running averages: near chance (0.25)
    assert recalibrate_batchnorm(model, [_quadrant_images(16)[0] for _ in range(5)]) == 5
    assert accuracy() > 0.95


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_batchnorm_holds_the_average_of_the_batches_it_saw(name: str) -> None:
    model = build(name, num_classes=10, dropout=0.5, drop_path_rate=0.5)  # both must be off while collecting
    seen: dict[nn.Module, list[torch.Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        seen.setdefault(module, []).append(inputs[0].detach().clone())

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [norm.register_forward_pre_hook(keep) for norm in norms]
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    assert recalibrate_batchnorm(model.train(), batches) == 2
    for hook in hooks:
        hook.remove()
    assert model.training and all(norm.momentum == model.spec.bn_momentum for norm in norms)
    for norm in norms:
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen[norm]])
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen[norm]])  # unbiased
        torch.testing.assert_close(norm.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    # No dropout, no stochastic depth: the same batches give the same statistics.
    before = [norm.running_var.clone() for norm in norms]
    recalibrate_batchnorm(model, batches)
    assert all(torch.equal(norm.running_var, old) for norm, old in zip(norms, before, strict=True))


def test_frozen_layers_keep_their_statistics() -> None:
    model = build("efficientnet_b0", num_classes=3)
    model.freeze(through_stage=0)
    frozen, trained = model.stages[0][0].depthwise.bn, model.stages[1][0].depthwise.bn
    frozen_before, trained_before = frozen.running_mean.clone(), trained.running_mean.clone()
    recalibrate_batchnorm(model.train(), [torch.randn(4, 3, 32, 32)])
    assert torch.equal(frozen.running_mean, frozen_before)
    assert not torch.equal(trained.running_mean, trained_before)


def test_no_batches_keep_the_statistics_there_were() -> None:
    model = build("efficientnet_b0", num_classes=3)
    model.stem.bn.running_mean.fill_(0.5)
    assert recalibrate_batchnorm(model, []) == 0
    assert torch.equal(model.stem.bn.running_mean, torch.full_like(model.stem.bn.running_mean, 0.5))
    assert model.stem.bn.running_var.eq(1).all()


def _rank(rank: int, port: int, results: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same model on both ranks
    model = build("efficientnet_b0", num_classes=3)
    torch.manual_seed(1 + rank)  # different batches
    recalibrate_batchnorm(model, [torch.randn(2, 3, 32, 32) + rank])
    results[rank] = model.stem.bn.running_mean.clone()
    dist.destroy_process_group()


def test_every_rank_ends_with_the_average_of_all_ranks() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.manual_seed(0)
    model = build("efficientnet_b0", num_classes=3)
    singles = []
    for rank in range(2):
        torch.manual_seed(1 + rank)
        images = torch.randn(2, 3, 32, 32) + rank
        with torch.no_grad():
            singles.append(model.stem.conv(images).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(results[0], (singles[0] + singles[1]) / 2)
