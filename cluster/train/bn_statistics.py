"""BatchNorm statistics recomputed for the weights as they are, before evaluation and saved weights.

In training, BatchNorm normalises with each batch's own statistics and keeps running averages for
evaluation. Those averages trail the weights: with momentum 0.01 (B5-B7, TensorFlow's) they are still
40 % their initial values after 90 steps, and even at 0.1 they describe weights that have since moved.
A short job evaluated, exported or quantized with them is judged on statistics it never trained with:
a B7 trained 2 epochs on the digits scored 10 % (chance) on validation with its running averages and
98 % with statistics recomputed over 10 batches (`README.md`, *Short jobs evaluate truthfully*).

So before each evaluation the running averages are replaced by exact averages over a few training
batches, run with the final weights in eval mode (no dropout, no stochastic depth: what evaluation
runs), BatchNorm alone collecting ("precise BatchNorm", Wu & Johnson 2021). Every rank averages its
own batches, then the ranks average theirs, so every replica evaluates and saves the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of `model`'s training BatchNorms with their average over `inputs`
    (model-ready tensors), averaged across ranks when a process group is up; returns the batches used.

    BatchNorms that stay in eval mode while the model trains (frozen stages) keep their statistics.
    With no inputs, nothing changes.
    """
    was_training = model.training
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    model.eval()
    if not norms:
        model.train(was_training)
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, each counted once
        norm.train()
    batches = 0
    try:
        for x in inputs:
            model(x)
            batches += 1
    finally:
        for norm, (momentum, mean, var, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if batches == 0:  # nothing seen: keep what there was rather than the reset's zeros and ones
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(count)
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        _average_across_ranks(norms)
    return batches


def _average_across_ranks(norms: list[_BatchNorm]) -> None:
    """One all-reduce for every layer's mean and variance (each rank's batches weigh the same)."""
    stats = [t for norm in norms for t in (norm.running_mean, norm.running_var)]
    flat = torch.cat([t.float().flatten() for t in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for tensor in stats:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
