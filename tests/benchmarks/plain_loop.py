"""The single-process training loop a PyTorch user would write for the same recipe, as a quality reference.

torchvision's EfficientNet (`--arch`), `ImageFolder` over the images unpacked to local files, a standard
`DataLoader`, torchvision's transforms (`transforms.v2`: random-resized crop for training; resize to
resolution / 0.875 and center crop for validation), AdamW without weight decay on norms and biases,
label smoothing, and a per-step learning rate: linear warm-up, then half a cosine down to a floor,
written as a `LambdaLR`. Only torch and torchvision are imported: nothing of ours.

`bench_quality.py` runs it beside `compound job run` with the same recipe; it writes the validation
top-1 after each epoch to `--result` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", type=Path, help="image folder of the training split: one sub-folder per class")
    parser.add_argument("val", type=Path, help="image folder of the validation split")
    parser.add_argument("--arch", default="efficientnet_b0", help="a torchvision classifier")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--crop-scale", type=float, nargs=2, required=True)
    parser.add_argument("--lr", type=float, required=True, help="peak learning rate")
    parser.add_argument("--warmup-epochs", type=float, required=True)
    parser.add_argument("--final-lr-fraction", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--label-smoothing", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = ImageFolder(str(args.train), transform=v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(args.resolution, scale=tuple(args.crop_scale), antialias=True), *normalise]))
    val = ImageFolder(str(args.val), transform=v2.Compose([
        v2.ToImage(), v2.Resize(round(args.resolution / EVAL_CROP_FRACTION), antialias=True),
        v2.CenterCrop(args.resolution), *normalise]))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers)
    val_loader = DataLoader(val, batch_size=64, num_workers=args.loader_workers)

    model = torchvision.models.get_model(args.arch, num_classes=len(train.classes)).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(train_loader)
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return args.final_lr_fraction + (1 - args.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    epochs = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            loss = criterion(model(images.contiguous(memory_format=torch.channels_last)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        hits = count = 0
        with torch.no_grad():
            for images, labels in val_loader:
                predicted = model(images.contiguous(memory_format=torch.channels_last)).argmax(dim=1)
                hits += int((predicted == labels).sum())
                count += labels.numel()
        epochs.append({"epoch": epoch, "val_top1": hits / count, "train_loss_last": loss.item(),
                       "seconds": time.perf_counter() - started})
        print(json.dumps(epochs[-1]), flush=True)
    args.result.write_text(json.dumps({"epochs": epochs, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup}))


if __name__ == "__main__":
    main()
