"""Images/s streamed from the local S3 store against the same tars read from local disk.

Both go through the same ShardLoader (same decode, augmentation, batch size and workers); only
the shard URLs differ. A round reads one epoch from each, the order reversed every other round (S3
first in the first round, local disk first in the second, ...); the ratio is the median of the
per-round ratios, with their range. Also prints how many img/s an EfficientNet-B0 training step
consumes at the same resolution, to show whether the loader would be the bottleneck.

Starts its own local stack in a temporary state dir on free ports, and stops it at the end.

    python tests/benchmarks/bench_loader.py [--resolution 64 --batch 32 --workers 2 --rounds 5]

Bar (issue 4): S3 / local >= 0.8.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from local_stack import local_stack
from rounds import Bar, bar_line, interleaved, ratios, spread

import effnet
from cluster.data.loader import ShardLoader
from cluster.data.manifest import ShardManifest, SplitInfo
from cluster.data.sources import DigitsSource
from cluster.data.transforms import AugmentSpec
from cluster.data.writer import write_shards
from cluster.storage import S3Access, split_s3_url
from jobs.s3 import s3_access

BAR = Bar(">=", 0.8)  # S3 / local


def local_copy(manifest: ShardManifest, s3: S3Access, directory: Path) -> ShardManifest:
    """The same manifest with every train shard downloaded to `directory`."""
    client = s3.client()
    shards = []
    for shard in manifest.split("train").shards:
        bucket, key = split_s3_url(shard.url)
        path = directory / Path(key).name
        client.download_file(bucket, key, str(path))
        shards.append(shard.model_copy(update={"url": str(path)}))
    return manifest.model_copy(update={"splits": {"train": SplitInfo(shards=tuple(shards))}})


def images_per_second(loader: ShardLoader) -> float:
    start = time.perf_counter()
    images = sum(batch.real_samples for batch in loader)
    return images / (time.perf_counter() - start)


def training_images_per_second(resolution: int, batch: int, steps: int = 5) -> float:
    model = effnet.build("efficientnet_b0", num_classes=10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, resolution, resolution), torch.randint(0, 10, (batch,))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5,
                        help="epochs read from each, interleaved (an epoch is a few seconds)")
    parser.add_argument("--shard-mb", type=float, default=1.0)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    with local_stack("cbench") as (stack, settings):
        home = stack.home
        s3 = s3_access(settings)
        source = DigitsSource(image_size=args.resolution, val_fraction=0.2, seed=0)
        manifest = write_shards(source, "s3://shards/bench/", s3=s3, shard_bytes=int(args.shard_mb * 2**20)).manifest
        local = local_copy(manifest, s3, home)
        train = manifest.split("train")
        print(f"digits at {args.resolution}px: {train.samples} train images in {len(train.shards)} shards "
              f"({sum(s.bytes for s in train.shards) / 2**20:.1f} MB), batch {args.batch}, "
              f"{args.workers} loader workers, train augmentation, {args.rounds} interleaved rounds of one epoch "
              "each (the order reversed every other round)")

        options = {"batch_size": args.batch, "resolution": args.resolution, "loader_workers": args.workers,
                   "s3": s3, "seed": 0, "augment": AugmentSpec()}
        rates = interleaved({"s3": lambda: images_per_second(ShardLoader(manifest, "train", **options)),
                             "local": lambda: images_per_second(ShardLoader(local, "train", **options))},
                            args.rounds)
        consumed = training_images_per_second(args.resolution, args.batch)

        print(f"{'streamed from S3, img/s':32}{spread(rates['s3'], fmt='.0f'):>24}  (median [range])")
        print(f"{'read from local disk, img/s':32}{spread(rates['local'], fmt='.0f'):>24}")
        print(bar_line("S3 / local", ratios(rates["s3"], rates["local"]), BAR, width=32))
        print(f"{'B0 training step consumes':32}{consumed:>10.0f} img/s"
              f"  -> the loader {'keeps up' if statistics.median(rates['s3']) >= consumed else 'is the bottleneck'}")



if __name__ == "__main__":
    main()
