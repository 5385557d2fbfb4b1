"""The wiring of a pipeline: references between stages, their order, and what a re-run invalidates.

An input is a value or a reference: `${data}` (the pipeline's dataset manifest),
`${stages.NAME.outputs.FIELD}`, or `${stages.NAME.outputs}` (all of a stage's outputs, for an input that
takes them typed). A string that is one reference takes the referenced value whatever its type; a
reference inside a longer string is put in as text. A `${` left unclosed, or a `$stages.…` or `$data` without
braces, is a mistake, not text: `broken_references` finds them for validation to refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REFERENCE = re.compile(r"\$\{([^}]*)\}")
STAGE_REFERENCE = re.compile(r"^stages\.([^.]+)\.outputs(?:\.([^.]+))?$")  # no FIELD: all of them
DATA_REFERENCE = "data"
# What is left of a string once its references are taken out, that was meant as one.
BROKEN_REFERENCE = re.compile(r"\$\{|\$\s*(?:stages\b|data\b)")


@dataclass(frozen=True)
class Reference:
    text: str  # what is inside ${…}
    path: str  # where in the stage's inputs, e.g. "with.teacher"

    @property
    def stage(self) -> str | None:
        match = STAGE_REFERENCE.match(self.text)
        return match.group(1) if match else None

    @property
    def output(self) -> str | None:
        """The output's name; None for all of the stage's outputs (or no stage reference)."""
        match = STAGE_REFERENCE.match(self.text)
        return match.group(2) if match else None


def references(value: Any, path: str = "with") -> list[Reference]:
    """Every reference in an input value, with where it is."""
    if isinstance(value, str):
        return [Reference(text.strip(), path) for text in REFERENCE.findall(value)]
    if isinstance(value, Mapping):
        return [ref for key, item in value.items() for ref in references(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [ref for index, item in enumerate(value) for ref in references(item, f"{path}[{index}]")]
    return []


def broken_references(value: Any, path: str = "with") -> list[tuple[str, str]]:
    """(where, the string) for every string in an input value that holds a reference written wrongly."""
    if isinstance(value, str):
        return [(path, value)] if BROKEN_REFERENCE.search(REFERENCE.sub("", value)) else []
    if isinstance(value, Mapping):
        return [broken for key, item in value.items() for broken in broken_references(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [broken for index, item in enumerate(value) for broken in broken_references(item, f"{path}[{index}]")]
    return []


def substitute(value: Any, lookup: Callable[[str], Any]) -> Any:
    """The value with every reference replaced by `lookup(text inside ${…})`."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return lookup(whole.group(1).strip())
        return REFERENCE.sub(lambda match: str(lookup(match.group(1).strip())), value)
    if isinstance(value, Mapping):
        return {key: substitute(item, lookup) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, lookup) for item in value]
    return value


def topological_order(needs: Mapping[str, list[str]]) -> list[str]:
    """The stages so that each comes after those it needs, otherwise in the order written.
    `ValueError` naming a cycle if there is one."""
    order: list[str] = []
    state: dict[str, str] = {}  # "visiting" | "done"

    def visit(stage: str, trail: list[str]) -> None:
        if state.get(stage) == "done":
            return
        if state.get(stage) == "visiting":
            cycle = trail[trail.index(stage):] + [stage]
            raise ValueError(" → ".join(cycle))
        state[stage] = "visiting"
        for needed in needs[stage]:
            visit(needed, [*trail, stage])
        state[stage] = "done"
        order.append(stage)

    for stage in needs:
        visit(stage, [])
    return order


def downstream(needs: Mapping[str, list[str]], start: str) -> set[str]:
    """`start` and every stage that needs it, directly or through others."""
    found = {start}
    changed = True
    while changed:
        changed = False
        for stage, needed in needs.items():
            if stage not in found and found.intersection(needed):
                found.add(stage)
                changed = True
    return found
