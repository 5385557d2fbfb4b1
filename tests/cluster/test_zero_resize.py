"""A ZeRO-2 job resized: the optimiser shards two ranks wrote, loaded by one rank (through DeepSpeed's universal
checkpoint), give the same next step as a single process that never stopped. AdamW, so the moments must carry
over too; each phase runs in processes of its own, as each attempt of a Ray Train worker does."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from cluster.train.config import TrainingSpec
from cluster.train.loop import weighted_loss
from cluster.train.strategy import DEEPSPEED_TAG, OPTIMIZER_SHARDS, make_strategy
from tests.cluster.test_multi_rank import MICRO_BATCH, _batch, _data, _model

MOST, ACCUMULATION, LR = 2, 2, 0.01


def _spec(strategy: dict, *, workers: dict | int, batch_size: int = MICRO_BATCH,
          accumulation: int = ACCUMULATION) -> TrainingSpec:
    return TrainingSpec.model_validate({
        "name": "zero-resize", "data": {"train": {"manifest": "s3://shards/digits/manifest.json"},
                                        "batch_size": batch_size},
        "strategy": strategy, "scaling": {"num_workers": workers}, "precision": {"channels_last": False},
        "optim": {"optimizer": "adamw", "weight_decay": 0.1, "grad_accumulation": accumulation},
    })


ELASTIC = _spec({"name": "deepspeed", "zero_stage": 2}, workers={"min": 1, "max": MOST})


def _micro_batches(step: int, rank: int, world: int) -> list:
    """This rank's micro-batches of the step's global batch (`MOST × ACCUMULATION × MICRO_BATCH` images)."""
    images, labels = _data(step)
    share = len(images) // world
    return [(images[i:i + MICRO_BATCH], labels[i:i + MICRO_BATCH])
            for i in range(rank * share, (rank + 1) * share, MICRO_BATCH)]


def _step_lr(strategy, parts) -> None:
    for index, (images, labels) in enumerate(parts):
        strategy.micro_step(_batch(images, labels), lambda logits, batch: weighted_loss(logits, batch, 0.0),
                            sync=index == len(parts) - 1)
    strategy.optimizer_step(lr=LR)


def _rank(rank: int, world: int, port: int, directory: str, results: dict) -> None:
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    checkpoint = Path(directory)
    strategy = make_strategy(_model(), ELASTIC, torch.device("cpu"))
    if world == MOST:  # the first attempt: a step, then every rank its shard of the checkpoint
        _step_lr(strategy, _micro_batches(0, rank, world))
        strategy.save(checkpoint, rank=rank)
    else:  # the restart on fewer ranks: the checkpoint, then the next step
        strategy.load(checkpoint)
        _step_lr(strategy, _micro_batches(1, rank, world))
        results[rank] = {name: tensor.detach().clone() for name, tensor in strategy.full_state_dict().items()}
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world: int, directory: Path, results: dict) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(world, port, str(directory), results), nprocs=world)


def test_a_zero2_checkpoint_of_two_ranks_resumes_on_one_with_its_adam_moments(tmp_path: Path) -> None:
    results = mp.Manager().dict()
    _spawn(MOST, tmp_path, results)
    assert len(list((tmp_path / DEEPSPEED_TAG).glob(OPTIMIZER_SHARDS))) == MOST
    _spawn(1, tmp_path, results)

    reference = make_strategy(_model(), _spec({"name": "ddp"}, workers=1, batch_size=MOST * ACCUMULATION * MICRO_BATCH,
                                              accumulation=1), torch.device("cpu"))
    for step in range(2):
        _step_lr(reference, [_data(step)])
    expected = reference.full_state_dict()
    assert results[0].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(results[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
