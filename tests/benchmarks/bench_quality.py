"""compound trains as well as a plain PyTorch loop: the same recipe, validation top-1 over seeds (issue 27).

- **ours**: `compound job run` of the smoke job (`jobs/examples/b0-cpu-smoke.yaml`: EfficientNet-B0, AdamW,
  warm-up then cosine, label smoothing, random-resized crops, 2 Ray Train workers × 1 CPU with DDP, the
  digits streamed from the local S3 store) at each `--resolutions` and `--seeds` (`optim.seed`).
- **plain**: `plain_loop.py` (next to this file), one process with the machine's 2 threads: torchvision's
  EfficientNet-B0 with torchvision's initialisation, `ImageFolder` + `DataLoader` over the same train and
  validation images unpacked to local files, the same epochs, global batch (per-worker batch × workers),
  peak LR, warm-up, cosine floor, weight decay (none on norms and biases), label smoothing, crop scale
  and evaluation transform, seeded with `torch.manual_seed(seed)`.

Prints each run's final validation top-1, then per resolution the mean ± sd of both, the difference, and a
verdict (bar: ours ≥ plain − 0.5 points). Then B7 at 32 px (`--b7-seeds`, default 1 seed) on both sides,
the same recipe with `efficientnet_b7`. Starts its own local stack on free ports and stops it at the end.

    python tests/benchmarks/bench_quality.py [--resolutions 32 64] [--seeds 0 1 2] [--epochs 3] [--b7-seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "examples" / "b0-cpu-smoke.yaml"
PLAIN_LOOP = Path(__file__).resolve().with_name("plain_loop.py")
BAR_POINTS = -0.5  # ours − plain, in top-1 points
PLAIN_THREADS = 2  # the plain loop is one process: it gets both cores, as ours gets two workers of one


def run_ours(spec: dict, home: Path) -> float:
    """The job's final validation top-1."""
    from local_stack import run_job

    return run_job(spec, home)["epochs"][-1]["val_top1"]


def run_plain(spec: dict, *, seed: int, train: Path, val: Path, work: Path) -> float:
    """plain_loop.py with the spec's recipe; its final validation top-1."""
    from jobs.spec import JobSpec

    job = JobSpec.model_validate(spec)
    optim, augment = job.optim, job.data.augment
    result = work / f"plain-{uuid.uuid4().hex[:6]}.json"
    command = [sys.executable, str(PLAIN_LOOP), str(train), str(val), "--arch", job.model.arch,
               "--epochs", str(optim.epochs), "--resolution", str(job.model.resolution),
               "--batch-size", str(job.data.batch_size * job.scaling.num_workers),
               "--loader-workers", str(job.data.loader_workers), "--crop-scale", *map(str, augment.crop_scale),
               "--lr", str(job.peak_lr), "--warmup-epochs", str(optim.warmup_epochs),
               "--final-lr-fraction", str(optim.final_lr_fraction), "--weight-decay", str(optim.weight_decay),
               "--label-smoothing", str(optim.label_smoothing), "--threads", str(PLAIN_THREADS),
               "--seed", str(seed), "--result", str(result)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(PLAIN_THREADS)})
    if done.returncode != 0:
        raise RuntimeError(f"plain_loop.py exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())["epochs"][-1]["val_top1"]


def recipe(base: dict, *, arch: str, resolution: int, seed: int, epochs: int, tag: str) -> dict:
    name = f"quality-{arch.removeprefix('efficientnet_')}-{resolution}-{seed}-{tag}"
    return {**base, "name": name, "model": {**base["model"], "arch": arch, "resolution": resolution},
            "optim": {**base["optim"], "seed": seed, "epochs": epochs}, "checkpoint": {"at_epoch_end": True, "keep": 1}}


def summarise(label: str, ours: list[float], plain: list[float]) -> None:
    def stats(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values) * 100:.2f} ± {spread * 100:.2f} %"

    difference = (statistics.mean(ours) - statistics.mean(plain)) * 100
    verdict = "met" if difference >= BAR_POINTS else "MISSED"
    print(f"{label}: ours {stats(ours)}  plain {stats(plain)}  ours − plain {difference:+.2f} points  "
          f"(bar ≥ {BAR_POINTS:+.1f}: {verdict})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--b7-seeds", type=int, nargs="*", default=[0], help="none: skip B7")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from local_stack import export_image_folder, local_stack, write_digits

    from jobs.s3 import s3_access

    with local_stack("cquality") as (stack, settings):
        home = stack.home
        s3 = s3_access(settings)
        manifest = write_digits(s3, resolution=64, shard_mb=0.25)
        images = {split: home / f"images-{split}" for split in ("train", "val")}
        for split, folder in images.items():
            export_image_folder(manifest, s3, folder, split=split)
        base = yaml.safe_load(SMOKE.read_text())
        tag = uuid.uuid4().hex[:6]
        groups = [(f"B0 at {r} px, {len(args.seeds)} seeds", "efficientnet_b0", r, args.seeds) for r in args.resolutions]
        if args.b7_seeds:
            groups.append((f"B7 at 32 px, {len(args.b7_seeds)} seed(s)", "efficientnet_b7", 32, args.b7_seeds))
        summaries = []
        for label, arch, resolution, seeds in groups:
            ours, plain = [], []
            for seed in seeds:
                spec = recipe(base, arch=arch, resolution=resolution, seed=seed, epochs=args.epochs, tag=tag)
                ours.append(run_ours(spec, home))
                plain.append(run_plain(spec, seed=seed, train=images["train"], val=images["val"], work=home))
                print(f"{arch} {resolution} px seed {seed}: val top-1 ours {ours[-1]:.4f}  plain {plain[-1]:.4f}",
                      flush=True)
            summaries.append((label, ours, plain))
        print(f"\nthe smoke job's recipe, {args.epochs} epochs, digits (validation split: "
              f"{manifest.split('val').samples} images)")
        for summary in summaries:
            summarise(*summary)


if __name__ == "__main__":
    main()
