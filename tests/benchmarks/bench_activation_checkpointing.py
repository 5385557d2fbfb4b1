"""Activation checkpointing per MBConv stage against none, on the same model in one process.

Two copies of one model (same weights, batch, resolution and thread count), one with
`set_activation_checkpointing()`. Step times interleave the two round by round (alternating which
goes first) and the ratio is the median of the per-round ratios, so drift on a shared machine
cancels out; peak memory of a training step counts what the step allocates on top of the weights
(the helpers are bench_effnet's, imported from beside this file).

Both steps allocate the weight gradients (4 bytes a parameter, 253 MB on B7); checkpointing saves
only activations, so the memory ratio means something where activations outweigh those: at
128 px and batch 16 they are several times larger. At B7's own 600 px they dominate completely.

    python tests/benchmarks/bench_activation_checkpointing.py [--model efficientnet_b7 --resolution 128
        --batch 16 --threads 2 --rounds 16]

Bar (issue: activation checkpointing on B7): peak training-step memory <= 0.6x and step time
<= 1.35x of the step without checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

# Run as a script, this file's folder is on sys.path: the measuring helpers are bench_effnet's.
from bench_effnet import NUM_CLASSES, interleaved_seconds, make_train_step, paired_speedup, peak_step_bytes

import effnet

MEMORY_BAR = 0.6  # checkpointed / plain peak step memory, at most
TIME_BAR = 1.35  # checkpointed / plain step time, at most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b7", choices=list(effnet.VARIANTS))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16, help="interleaved timing rounds (at least 2)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the ratio's quartiles need two), got {args.rounds}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    plain = effnet.build(args.model)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing()
    models = {"plain": plain, "checkpointed": checkpointed}
    weight_grad_mb = sum(p.numel() * p.element_size() for p in plain.parameters()) / 2**20
    print(f"{args.model}, {args.resolution}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.rounds} interleaved rounds; "
          f"checkpointing per stage ({len(plain.stages)} stages, "
          f"{sum(len(stage) for stage in plain.stages)} MBConv blocks)")

    train = {name: make_train_step(model, images, labels) for name, model in models.items()}
    seconds = interleaved_seconds(train, args.rounds, warmup=1)  # warm-up also allocates SGD momentum
    peak = {name: peak_step_bytes(step) / 2**20 for name, step in train.items()}

    time_ratio, q1, q3 = paired_speedup(seconds["plain"], seconds["checkpointed"])  # checkpointed / plain
    memory_ratio = peak["checkpointed"] / peak["plain"]
    plain_s, checkpointed_s = (statistics.median(seconds[name]) for name in models)
    print(f"{'':24}{'plain':>10}{'checkpointed':>14}{'ratio':>8}  {'[quartiles]':16} bar")
    print(f"{'training step peak MB':24}{peak['plain']:>10.0f}{peak['checkpointed']:>14.0f}{memory_ratio:>8.3f}  "
          f"{'':16} <= {MEMORY_BAR}  {'met' if memory_ratio <= MEMORY_BAR else 'MISSED'}")
    print(f"{'training step s':24}{plain_s:>10.2f}{checkpointed_s:>14.2f}{time_ratio:>8.3f}  "
          f"[{q1:.3f}, {q3:.3f}]   <= {TIME_BAR}  {'met' if time_ratio <= TIME_BAR else 'MISSED'}")
    print(f"{'training img/s':24}{args.batch / plain_s:>10.1f}{args.batch / checkpointed_s:>14.1f}")
    above_grads = (peak["checkpointed"] - weight_grad_mb) / (peak["plain"] - weight_grad_mb)
    print(f"\nBoth peaks include up to {weight_grad_mb:.0f} MB of weight gradients, which checkpointing cannot "
          f"save; less those, the ratio is {above_grads:.3f} (roughly the activations' share).")

if __name__ == "__main__":
    main()
