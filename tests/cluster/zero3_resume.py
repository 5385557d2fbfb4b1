"""One worker of a one-worker ZeRO-3 job on CPU, in a process of its own as under Ray Train:
`first DIR` trains 3 steps and checkpoints; `resumed DIR` loads that checkpoint, trains a step, validates,
checkpoints and trains on. Prints the losses and weight checks as JSON."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import effnet
from cluster.data.loader import Batch
from cluster.train.config import TrainingSpec
from cluster.train.strategy import DeepSpeed


def main(phase: str, directory: Path) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", store=dist.FileStore(str(directory / f"store-{phase}"), 1), rank=0, world_size=1)
    spec = TrainingSpec.model_validate({
        "name": "zero3-resume", "data": {"train": {"manifest": "s3://shards/digits/manifest.json"}, "batch_size": 16},
        "strategy": {"name": "deepspeed", "zero_stage": 3}, "scaling": {"num_workers": 1},
    })
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    batch = Batch(images.to(memory_format=torch.channels_last), labels, torch.ones(16), tuple(map(str, range(16))), ())
    strategy = DeepSpeed(effnet.build("efficientnet_b0", num_classes=10), spec, torch.device("cpu"))

    def train(steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            loss = strategy.micro_step(batch, lambda logits, b: F.cross_entropy(logits, b.labels), sync=True)
            strategy.optimizer_step(lr=0.001)
            losses.append(loss.item())
        return losses

    result: dict[str, object] = {}
    if phase == "first":
        result["losses"] = train(3)
        strategy.save(directory / "checkpoint", rank=0)
    else:
        strategy.load(directory / "checkpoint")
        result["losses"] = train(1)
        strategy.module.eval()
        with torch.no_grad():  # validation runs the layers unfused: a whole batch, then a last, partial one
            strategy.module(images)
            strategy.module(images[:5])
        strategy.module.train()
        strategy.save(directory / "epoch-end", rank=0)
        before = strategy.full_state_dict()
        result["losses"] += train(2)
        after = strategy.full_state_dict()
        result["trained"] = [not torch.equal(after[k], before[k]) for k in ("classifier.weight", "stem.bn.weight")]
    dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
