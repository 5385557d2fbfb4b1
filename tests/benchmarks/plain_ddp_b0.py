"""The training script a user would write without compound: torchvision's EfficientNet-B0 under DDP.

Launched by torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N plain_ddp_b0.py …`)
over an image folder on local disk (one sub-folder per class, read by `torchvision.datasets.ImageFolder`),
with a `DistributedSampler` and a standard `DataLoader`, the transforms torchvision's docs recommend
(`transforms.v2`), AdamW and label smoothing, gloo for the gradients. Only torch and torchvision are
imported: nothing of ours.

`bench_training.py` runs it beside our smoke job. The one addition to what a user writes is the
timing, measured as our train loop measures it: per epoch, each rank times its pass over the data
loader (nothing else), and

    img/s = real samples of all ranks / mean of the ranks' training seconds

where real samples leave out the repeats `DistributedSampler` adds to give every rank as many.
The DataLoader keeps its workers from epoch to epoch (`persistent_workers=True`, a common setting):
they start in the first epoch only, as ours start in the first epoch and later during evaluation,
untimed. Rank 0 writes the per-epoch figures to `--result` as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

log = logging.getLogger("plain_ddp_b0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="image folder: one sub-folder per class")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per rank")
    parser.add_argument("--loader-workers", type=int, required=True, help="DataLoader workers per rank")
    parser.add_argument("--crop-scale", type=float, nargs=2, required=True)
    parser.add_argument("--horizontal-flip", action="store_true")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--label-smoothing", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch threads per rank")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", type=Path, required=True, help="rank 0 writes its per-epoch figures here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")  # env:// rendezvous from torchrun's variables
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    steps = [v2.ToImage(), v2.RandomResizedCrop(args.resolution, scale=tuple(args.crop_scale), antialias=True)]
    if args.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    dataset = ImageFolder(str(args.data), transform=v2.Compose(steps))
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    # Workers that outlive an epoch: no worker start inside a later epoch's timing (torch allows it only with workers).
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.loader_workers,
                        persistent_workers=args.loader_workers > 0)
    padding = sampler.total_size - len(dataset)  # repeats that even out the ranks: not real samples

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = torchvision.models.efficientnet_b0(num_classes=len(dataset.classes)).to(memory_format=memory_format)
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    epochs = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        samples, steps_done = 0, 0
        started = time.perf_counter()
        for images, labels in loader:
            images = images.contiguous(memory_format=memory_format)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += labels.numel()
            steps_done += 1
        seconds = time.perf_counter() - started
        totals = torch.tensor([samples, seconds], dtype=torch.float64)
        dist.all_reduce(totals)
        real = int(totals[0]) - padding
        images_per_s = real / (float(totals[1]) / world_size)
        epochs.append({"epoch": epoch, "steps": steps_done, "train_samples_epoch": real,
                       "train_images_per_s": images_per_s, "loss": loss.item()})
        if rank == 0:
            log.info("epoch %d: %d steps, %d samples, %.1f img/s, loss %.4f", epoch, steps_done, real, images_per_s,
                     loss.item())

    if rank == 0:
        args.result.write_text(json.dumps({
            "epochs": epochs, "world_size": world_size, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
            "channels_last": args.channels_last, "persistent_workers": loader.persistent_workers,
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
