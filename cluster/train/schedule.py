"""The learning-rate schedule: a pure function of the optimiser step (nanoGPT style)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up from ~0 to `peak` over `warmup_steps`, then half a cosine down to `peak × final_fraction`."""

    peak: float
    warmup_steps: int
    total_steps: int
    final_fraction: float

    def __call__(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        floor = self.peak * self.final_fraction
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
