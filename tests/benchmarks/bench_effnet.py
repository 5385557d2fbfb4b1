"""Our EfficientNet (B0 by default) against torchvision's, side by side in one process.

Same batch, resolution and thread count for both; timings interleave the two models round by
round (alternating which goes first) and the ratio is the median of the per-round ratios, so drift
on a shared machine cancels out; the quartiles of those ratios show how noisy the machine was. Peak memory of a training
step is measured from the CPU allocator's events (torch.profiler), counting what the step itself
allocates on top of the weights.

    python tests/benchmarks/bench_effnet.py [--model efficientnet_b0 --resolution 128 --batch 32 --threads 2]

Bar (issue 2): training throughput >= 1.0x and peak memory <= 1.0x of torchvision's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import ProfilerActivity, profile

import effnet

log = logging.getLogger("bench_effnet")
NUM_CLASSES = 1000


def make_train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside every step

    return step


def make_inference(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return infer


def interleaved_seconds(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, one call each per round, the order reversed every other round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(rounds):
        order = list(fns) if round_index % 2 == 0 else list(reversed(fns))
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_speedup(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio theirs/ours: drift between rounds cancels out."""
    ratios = sorted(t / o for o, t in zip(ours, theirs, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median, q1, q3


def peak_step_bytes(fn: Callable[[], None]) -> int:
    """Highest total of live CPU allocations made during one call of `fn`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0", choices=list(effnet.VARIANTS))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    models = {"ours": effnet.build(args.model), "torchvision": getattr(torchvision.models, args.model)()}
    print(f"{args.model}, {args.resolution}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.rounds} interleaved rounds")

    train = {name: make_train_step(m, images, labels) for name, m in models.items()}
    infer = {name: make_inference(m, images) for name, m in models.items()}
    train_s = interleaved_seconds(train, args.rounds, warmup=2)
    infer_s = interleaved_seconds(infer, args.rounds, warmup=2)
    peak = {name: peak_step_bytes(fn) for name, fn in train.items()}

    def throughput_row(label: str, seconds: dict[str, list[float]], bar: float | None) -> None:
        ratio, q1, q3 = paired_speedup(seconds["ours"], seconds["torchvision"])
        ours, theirs = (args.batch / statistics.median(seconds[n]) for n in ("ours", "torchvision"))
        verdict = "" if bar is None else f">= {bar}  " + ("met" if ratio >= bar else "MISSED")
        print(f"{label:24}{ours:>10.1f}{theirs:>13.1f}{ratio:>10.3f}  [{q1:.3f}, {q3:.3f}]   {verdict}")

    print(f"{'':24}{'ours':>10}{'torchvision':>13}{'ours/tv':>10}  {'[quartiles]':16} bar")
    throughput_row("training img/s", train_s, bar=1.0)
    ratio = peak["ours"] / peak["torchvision"]
    print(f"{'training step peak MB':24}{peak['ours'] / 2**20:>10.0f}{peak['torchvision'] / 2**20:>13.0f}"
          f"{ratio:>10.3f}  {'':16} <= 1.0  {'met' if ratio <= 1.0 else 'MISSED'}")
    throughput_row("inference img/s", infer_s, bar=None)

    print(f"\nOur {args.model}, variations (ratio against eager, contiguous):")
    variants = {"eager": effnet.build(args.model),
                "channels_last": effnet.build(args.model).to(memory_format=torch.channels_last)}
    if not args.no_compile:
        variants["torch.compile"] = torch.compile(effnet.build(args.model))
    inputs = {name: images.contiguous(memory_format=torch.channels_last) if name == "channels_last" else images
              for name in variants}
    start = time.perf_counter()
    for name, model in variants.items():  # first calls compile; keep that out of the timings
        make_train_step(model, inputs[name], labels)()
        make_inference(model, inputs[name])()
    log.info("warm-up and compilation took %.0f s", time.perf_counter() - start)
    train_s = interleaved_seconds({n: make_train_step(m, inputs[n], labels) for n, m in variants.items()},
                                  args.rounds, warmup=1)
    infer_s = interleaved_seconds({n: make_inference(m, inputs[n]) for n, m in variants.items()},
                                  args.rounds, warmup=1)
    print(f"{'':24}{'train img/s':>12}{'ratio':>8}{'infer img/s':>13}{'ratio':>8}")
    for name in variants:
        train_ratio = paired_speedup(train_s[name], train_s["eager"])[0]
        infer_ratio = paired_speedup(infer_s[name], infer_s["eager"])[0]
        print(f"{name:24}{args.batch / statistics.median(train_s[name]):>12.1f}{train_ratio:>8.2f}"
              f"{args.batch / statistics.median(infer_s[name]):>13.1f}{infer_ratio:>8.2f}")


if __name__ == "__main__":
    main()
