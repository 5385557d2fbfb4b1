"""int8 against fp32 ONNX for a B0 trained here at 224 px, with ONNX Runtime on 2 threads.

Trains a B0 on the digits at 224 px (`--epochs`, in this process), then runs what
`compound model quantize` runs (`jobs.quantize.quantize_model`: export, calibration on 8 training
batches, the recipe ladder with a 1-point limit) and prints, for the kept recipe and for every recipe
tried: top-1 drop on the validation split, batch-32 and batch-1 latency (p50) and file size, each as
int8 ÷ fp32; and the kept model's batch-32 ratio over interleaved rounds (median and range). If no
recipe is within the limit, it says so and still prints every recipe's figures.
Bars (issue 11): batch-32 latency ≤ 0.6×, size ≤ 0.35×, drop ≤ 1 point.

    python tests/benchmarks/bench_quantize.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESOLUTION, THREADS, ROUNDS = 224, 2, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    import torch
    import torch.nn.functional as F
    from local_stack import local_stack, write_digits

    import effnet
    from cluster.data.loader import ShardLoader
    from cluster.data.transforms import AugmentSpec
    from cluster.evaluate import evaluate, split_batches
    from cluster.quantize import RECIPES, QuantizationError, quantize
    from effnet.export import export_onnx
    from effnet.weights import save_checkpoint
    from jobs.model_source import ModelRef
    from jobs.quantize import FP32_FILE, INT8_FILE, quantize_model
    from jobs.s3 import s3_access

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(THREADS)
    with local_stack("cquant") as (stack, settings):
        home = stack.home
        s3 = s3_access(settings)
        digits = write_digits(s3, resolution=64, shard_mb=0.25)
        torch.manual_seed(0)
        model = effnet.build("efficientnet_b0", num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        loader = ShardLoader(digits, "train", batch_size=32, resolution=RESOLUTION, s3=s3, loader_workers=1,
                             augment=AugmentSpec(crop_scale=(0.35, 1.0), horizontal_flip=False))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, pct_start=0.15,
                                                       total_steps=args.epochs * loader.steps_per_epoch)
        model.train()
        for epoch in range(args.epochs):
            loader.load_state_dict({"epoch": epoch, "step": 0})
            for batch in loader:
                loss = (F.cross_entropy(model(batch.images), batch.labels, reduction="none",
                                        label_smoothing=0.1) * batch.weights).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            print(f"trained epoch {epoch + 1}/{args.epochs}", flush=True)
        weights = save_checkpoint(model.eval(), home / "b0.safetensors")
        fp32_path = export_onnx(model, home / FP32_FILE, resolution=RESOLUTION, dynamic_batch=True)
        validation = list(split_batches(digits, "val", resolution=RESOLUTION, s3=s3))
        fp32, _ = evaluate(fp32_path, validation, num_classes=10, threads=THREADS)
        print(f"\nB0 at {RESOLUTION} px, {THREADS} ONNX Runtime threads; fp32 top-1 {fp32.top1:.4f} "
              f"on {fp32.samples} validation images")

        try:
            outcome = quantize_model(ModelRef(str(weights), resolution=RESOLUTION),
                                     data="s3://shards/digits/manifest.json", out=home / "quantized",
                                     max_drop_points=1.0, calibration_batches=8, threads=THREADS, s3=s3,
                                     tracking_uri=settings.mlflow_tracking_uri)
        except QuantizationError as error:  # the figures below still say what each recipe costs
            print(f"kept recipe: none, the drop bar (<= 1 point) is MISSED: {error}")
        else:
            print(f"kept recipe: {outcome.recipe.name} ({outcome.recipe.description})")
            _print_ratios("kept", outcome.fp32, outcome.int8)
            _print_interleaved(home / "quantized" / FP32_FILE, home / "quantized" / INT8_FILE,
                               images=validation[0][0])

        # Every recipe's speed too: what the fast ones would give, and what they cost in accuracy.
        calibration = list(split_batches(digits, "train", resolution=RESOLUTION, s3=s3, shuffle=True, limit=8))
        for recipe in RECIPES:
            path = home / f"{recipe.name}.onnx"
            try:
                quantize(fp32_path, path, calibration=calibration, evaluation=validation,
                         max_drop_points=100.0, threads=THREADS, recipes=(recipe,))
            except Exception as error:  # noqa: BLE001 - a recipe ORT refuses is reported, not fatal
                print(f"{recipe.name}: {error}")
                continue
            evaluation, _ = evaluate(path, validation, num_classes=10, threads=THREADS)
            _print_ratios(recipe.name, fp32, evaluation)



def _print_interleaved(fp32: Path, int8: Path, *, images, rounds: int = ROUNDS) -> None:
    """The kept model's batch-32 ratio again, fp32 and int8 measured in turns: one busy moment on a shared
    machine moves a single measurement by 20 %; the median of the rounds' ratios and their range show it."""
    import statistics

    from cluster.evaluate import latency

    ratios = []
    for _ in range(rounds):
        ratios.append(latency(int8, images, THREADS)[32]["p50"] / latency(fp32, images, THREADS)[32]["p50"])
    print(f"kept, batch-32 latency in {rounds} interleaved rounds: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)


def _print_ratios(label: str, fp32, int8) -> None:
    b32 = int8.latency_ms[32]["p50"] / fp32.latency_ms[32]["p50"]
    b1 = int8.latency_ms[1]["p50"] / fp32.latency_ms[1]["p50"]
    print(f"{label:32} drop {(fp32.top1 - int8.top1) * 100:6.2f} points  batch-32 latency {b32:5.2f}x "
          f"({int8.latency_ms[32]['p50']:.0f} vs {fp32.latency_ms[32]['p50']:.0f} ms)  batch-1 {b1:5.2f}x "
          f"({int8.latency_ms[1]['p50']:.1f} vs {fp32.latency_ms[1]['p50']:.1f} ms)  size "
          f"{int8.size_mb / fp32.size_mb:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
