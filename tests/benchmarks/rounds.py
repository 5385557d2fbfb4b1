"""Interleaved rounds, and the bar lines the benchmarks print.

A round measures every side once; every other round reverses the order, so whatever favours going
first (warm caches, a cool CPU) or last (a machine that has quietened) favours each side in half the
rounds. Sides are compared by the per-round ratios, so drift between rounds cancels out. A bar line
gives the figure over the rounds, its spread, the bar and "met" or "MISSED".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

DEFAULT_ROUNDS = 3  # the fewest that show a spread with a middle value
T = TypeVar("T")
R = TypeVar("R")


def round_order(sides: Sequence[T], round_index: int) -> list[T]:
    """`sides` as given in even rounds, reversed in odd ones."""
    return list(sides) if round_index % 2 == 0 else list(reversed(sides))


def interleaved(measures: Mapping[str, Callable[[], R]], rounds: int) -> dict[str, list[R]]:
    """Each side's figure per round: every measure called once a round, in `round_order`."""
    figures: dict[str, list[R]] = {name: [] for name in measures}
    for round_index in range(rounds):
        for name in round_order(list(measures), round_index):
            figures[name].append(measures[name]())
    return figures


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round by round: the i-th numerator over the i-th denominator."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


@dataclass(frozen=True)
class Bar:
    """What a figure must reach: `op` ">=" (at least `value`) or "<=" (at most)."""

    op: Literal[">=", "<="]
    value: float

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def verdict(self, figure: float) -> str:
        """'bar >= 0.8  met' or 'bar >= 0.8  MISSED'."""
        return f"bar {self.op} {self.value:g}  {'met' if self.met(figure) else 'MISSED'}"


def spread(values: Sequence[float], *, center: Literal["median", "mean"] = "median", fmt: str = ".2f") -> str:
    """'1.23 [1.10, 1.31]' (median and range) or '1.23 ± 0.08 [1.10, 1.31]' (mean, sd and range)."""
    low, high = min(values), max(values)
    if center == "median":
        return f"{statistics.median(values):{fmt}} [{low:{fmt}}, {high:{fmt}}]"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def bar_line(label: str, values: Sequence[float], bar: Bar, *, center: Literal["median", "mean"] = "median",
             fmt: str = ".2f", width: int = 44, rounds: str = "rounds") -> str:
    """One bar: the figure over the rounds (`rounds` says what they are) with its spread, the bar and the
    verdict on the center."""
    figure = statistics.median(values) if center == "median" else statistics.mean(values)
    over = f"{center} of {len(values)} {rounds if len(values) != 1 else rounds.removesuffix('s')}"
    return f"{label:{width}}{spread(values, center=center, fmt=fmt):>24}  ({over})  {bar.verdict(figure)}"
