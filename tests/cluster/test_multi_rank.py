"""Two ranks over gloo take the same steps as one process over the whole batch: gradient accumulation
(DDP's `no_sync` on the micro-steps that do not end a step), ZeRO-1's partitioned optimiser, a checkpoint
of each saved by every rank and loaded by fresh strategies, and the EMA of the weights.

Each rank runs two micro-batches of two images per step; the reference runs the same eight images in one
micro-batch. The model has no BatchNorm, whose batch statistics would differ between a micro-batch of two
and one of eight: everything else must agree to rounding."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from cluster.data.loader import Batch
from cluster.train.config import TrainingSpec
from cluster.train.loop import weighted_loss
from cluster.train.strategy import WeightEMA, make_strategy

WORLD, ACCUMULATION, MICRO_BATCH = 2, 2, 2
EMA_DECAY, LR = 0.5, 0.1
STRATEGIES = {"ddp": {"name": "ddp"}, "zero1": {"name": "deepspeed", "zero_stage": 1}}


def _spec(strategy: dict, *, workers: int, batch_size: int, accumulation: int) -> TrainingSpec:
    return TrainingSpec.model_validate({
        "name": "multi-rank", "data": {"train": {"manifest": "s3://shards/digits/manifest.json"},
                                       "batch_size": batch_size},
        "strategy": strategy, "scaling": {"num_workers": workers}, "precision": {"channels_last": False},
        "optim": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "grad_accumulation": accumulation,
                  "ema_decay": EMA_DECAY},
    })


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    images = torch.randn(WORLD * ACCUMULATION * MICRO_BATCH, 3, 8, 8, generator=generator)
    return images, torch.randint(0, 5, (len(images),), generator=generator)


def _batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    return Batch(images, labels, torch.ones(len(labels)), tuple(map(str, range(len(labels)))), ())


def _step(strategy, ema: WeightEMA, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for index, (images, labels) in enumerate(parts):
        strategy.micro_step(_batch(images, labels), lambda logits, batch: weighted_loss(logits, batch, 0.0),
                            sync=index == len(parts) - 1)
    strategy.optimizer_step(lr=LR)
    ema.update(strategy.module)


def _weights(strategy, ema: WeightEMA) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in strategy.full_state_dict().items()}
    return state | {f"ema.{name}": tensor.clone() for name, tensor in ema.state_dict().items()}


def _rank(rank: int, port: int, directory: str, results: dict) -> None:
    """Both strategies, one after the other, in one process per rank (starting one costs seconds)."""
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for name in STRATEGIES:
        results[(name, rank)] = _two_steps(name, rank, Path(directory) / name)
    dist.destroy_process_group()


def _two_steps(name: str, rank: int, directory: Path) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    spec = _spec(STRATEGIES[name], workers=WORLD, batch_size=MICRO_BATCH, accumulation=ACCUMULATION)

    def mine(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = _data(step)
        start = rank * ACCUMULATION * MICRO_BATCH
        return [(images[i:i + MICRO_BATCH], labels[i:i + MICRO_BATCH])
                for i in range(start, start + ACCUMULATION * MICRO_BATCH, MICRO_BATCH)]

    strategy = make_strategy(_model(), spec, torch.device("cpu"))
    ema = WeightEMA(strategy.module, EMA_DECAY)
    _step(strategy, ema, mine(0))
    checkpoint = directory / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    strategy.save(checkpoint, rank=rank)
    ema_state = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
    dist.barrier()
    # As after a restart: a fresh model and strategy, the state loaded, the next step taken.
    torch.manual_seed(rank + 1)  # other weights than the first model's: the checkpoint must replace them
    strategy = make_strategy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
                             spec, torch.device("cpu"))
    strategy.load(checkpoint)
    ema = WeightEMA(strategy.module, EMA_DECAY)
    ema.load_state_dict(ema_state)
    _step(strategy, ema, mine(1))
    return _weights(strategy, ema)


def _one_process() -> dict[str, torch.Tensor]:
    spec = _spec({"name": "ddp"}, workers=1, batch_size=WORLD * ACCUMULATION * MICRO_BATCH, accumulation=1)
    strategy = make_strategy(_model(), spec, torch.device("cpu"))
    ema = WeightEMA(strategy.module, EMA_DECAY)
    for step in range(2):
        _step(strategy, ema, [_data(step)])
    return _weights(strategy, ema)


def test_two_ranks_accumulating_take_the_whole_batch_steps_through_a_checkpoint(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, str(tmp_path), results), nprocs=WORLD)
    expected = _one_process()
    assert not torch.allclose(expected["3.weight"], _model().state_dict()["3.weight"])  # the steps moved the weights
    for name in STRATEGIES:
        for rank in range(WORLD):
            got = results[(name, rank)]
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}, rank {rank}: {key}")
