"""YAML → validated, frozen job specs.

A job spec assembles the sections owned by the packages that use them (`cluster.train.config`,
`cluster.data.spec`, `cluster.tracking`); this module only reads YAML safely, puts the sections
together and turns validation errors into messages that name the field's path, the value and
what is allowed.

Reading is strict: one mapping per file, at most `MAX_SPEC_BYTES`; no anchors or aliases (no
alias bombs), no explicit tags, no duplicate keys; unknown keys are refused at every level.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cluster.tracking import TrackingSpec
from cluster.train.config import TrainingSpec

MAX_SPEC_BYTES = 1 << 20
MAX_SHOWN_VALUE = 80


class SpecError(ValueError):
    """A spec is malformed or does not fit the cluster or data; `problems` says each thing wrong."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, tuple(problems)
        super().__init__(f"{source} is not a valid spec:\n" + "\n".join(f"  - {p}" for p in problems))


class JobSpec(TrainingSpec):
    """One training job: the training sections and how it is tracked."""

    tracking: TrackingSpec = TrackingSpec()

    @property
    def run_names(self) -> tuple[str, str]:
        """(MLflow experiment, run name): the tracking section's, or the job name."""
        return self.tracking.experiment or self.name, self.tracking.run_name or self.name


# --- YAML --------------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus anchors, aliases, explicit tags and duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.YAMLError(f"{where}: anchors and aliases (&name, *name) are not allowed; write the values out")
        collection = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        explicit = collection and not event.implicit or isinstance(event, yaml.ScalarEvent) and event.tag
        if explicit:
            raise yaml.YAMLError(f"{where}: tags ({event.tag}) are not allowed; write plain values")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML spec file, read strictly; `SpecError` says what is wrong with it."""
    source = str(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise SpecError(source, [f"cannot read the file: {error.strerror}"]) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError(source, [f"the file is {size:,} bytes; specs are at most {MAX_SPEC_BYTES:,}"])
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(source, ["the file is not UTF-8 text"]) from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """The mapping in a spec's YAML text, read strictly."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(source, [f"the spec is over {MAX_SPEC_BYTES:,} bytes"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise SpecError(source, [f"not valid YAML: {error}"]) from None
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"a spec is a mapping of sections (name: …, model: …); this file holds {found}"])
    return data


def parse_spec(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate `data` as `model`, or raise `SpecError` with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, [_describe(problem, model) for problem in error.errors()]) from None


def load_job_spec(path: Path) -> JobSpec:
    """A job spec file → `JobSpec`. A relative `model.pretrained` is relative to the spec's folder."""
    data = read_yaml(path)
    pretrained = (data.get("model") or {}).get("pretrained") if isinstance(data.get("model"), dict) else None
    if isinstance(pretrained, str):
        weights = (path.parent / pretrained).expanduser().resolve()
        if not weights.is_file():
            raise SpecError(str(path), [f"model.pretrained: no weights file at {weights}"])
        data = {**data, "model": {**data["model"], "pretrained": str(weights)}}
    return parse_spec(JobSpec, data, str(path))


def load_job_spec_text(text: str, source: str) -> JobSpec:
    """A job spec from YAML text (as `submit` stores it: paths already absolute)."""
    return parse_spec(JobSpec, parse_yaml(text, source), source)


def dump_spec(spec: BaseModel) -> str:
    """The spec as YAML, every default included: what `compound job validate` prints."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


# --- error messages ----------------------------------------------------------------------------------

def _describe(problem: dict, root: type[BaseModel]) -> str:
    loc = problem["loc"]
    path = _path(loc) or "(top level)"
    kind, message = problem["type"], problem["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _fields_at(root, loc[:-1])
        return f"{path}: unknown field; allowed here: {', '.join(allowed)}" if allowed else f"{path}: unknown field"
    if kind == "missing":
        return f"{path}: required, but missing"
    if not loc or kind == "value_error" and isinstance(problem.get("input"), dict):
        return f"{path}: {message}"
    return f"{path}: {message} (got {_show(problem.get('input'))})"


def _path(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= MAX_SHOWN_VALUE else shown[: MAX_SHOWN_VALUE - 1] + "…"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found by walking `loc` from `root` (tagged unions by their tag)."""
    models = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        by_tag = [m for m in models if _tag(m) == part]
        if by_tag:  # pydantic puts a discriminated union's tag into the path
            models = by_tag
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return []
        models = _models_in(fields[0].annotation)
        if not models:
            return []
    return sorted(models[0].model_fields) if len(models) == 1 else []


def _tag(model: type[BaseModel]) -> object:
    """The literal `name` that tags a member of a discriminated union, if the model has one."""
    field = model.model_fields.get("name")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    return typing.get_args(field.annotation)[0]


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
