"""YAML → validated, frozen job and sweep specs.

A job spec assembles the sections owned by the packages that use them (`cluster.train.config`,
`cluster.data.spec`, `cluster.tracking`); this module only reads YAML safely, puts the sections
together and turns validation errors into messages that name the field's path, the value and
what is allowed.

Reading is strict: one mapping per file, at most `MAX_SPEC_BYTES` and `MAX_SPEC_DEPTH` levels deep; no
anchors or aliases (no alias bombs), no explicit tags, no duplicate keys; unknown keys are refused at every
level. Values pydantic would quietly convert are refused too: true/false where a number belongs (it reads
them as 1 and 0), and infinities or NaN (`.inf`, `.nan`) anywhere a number belongs.
"""

from __future__ import annotations

import copy
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cluster.tracking import TrackingSpec
from cluster.train.config import FORM_TAGS, TrainingSpec
from cluster.tune import AshaSpec, Dimension, SearcherSpec

MAX_SPEC_BYTES = 1 << 20
# The deepest a spec needs is about ten levels (a pipeline's inline sweep's job's DeepSpeed override);
# the bound stops a file of a thousand `[` before it exhausts Python's stack.
MAX_SPEC_DEPTH = 32
MAX_SHOWN_VALUE = 80
# A trial's job is named <sweep>-<Tune trial id> (12 characters), within a job name's 63.
SWEEP_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,49}$"
# What a trial may not change: its identity, where it is stored and tracked, what it reads, and the
# resources every trial shares (so the cluster's room for trials is known before any starts).
NOT_SWEPT = ("name", "tracking", "scaling", "checkpoint", "failure", "data.train", "data.val", "data.sample_log")
SWEEP_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "ema_val_top1", "ema_val_top5", "ema_val_loss")


class SpecError(ValueError):
    """A spec is malformed or does not fit the cluster or data; `problems` says each thing wrong."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, tuple(problems)
        super().__init__(f"{source} is not a valid spec:\n" + "\n".join(f"  - {p}" for p in problems))


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: Any) -> Any:
    """A duration as seconds: a number of them, or a number with a unit (`90s`, `30m`, `2h`, `1.5d`)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration: write seconds, or a number with s, m, h or d (e.g. 2h)")
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_seconds), Field(gt=0, allow_inf_nan=False)]
MAX_RUNTIME = Field(default=None, description=(
    "stop the submitted run once it has run this long (seconds, or 30m, 2h, 1d), marked TIMED_OUT; its "
    "checkpoints stay, so submitting it again resumes it"))


class JobSpec(TrainingSpec):
    """One training job: the training sections and how it is tracked."""

    tracking: TrackingSpec = TrackingSpec()
    max_runtime: Duration | None = MAX_RUNTIME

    @property
    def run_names(self) -> tuple[str, str]:
        """(MLflow experiment, run name): the tracking section's, or the job name."""
        return self.tracking.experiment or self.name, self.tracking.run_name or self.name


class SweepSpec(BaseModel):
    """A sweep: a base job, the space its trials sample over job fields (by path), and how to search.
    `job` is the base job spec's mapping, as written inline or in the file it names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=SWEEP_NAME_PATTERN, description="names the sweep's parent run and its trials' jobs")
    job: dict[str, Any] = Field(description="the base job: a job spec's path (relative to this file) or inline")
    space: dict[str, Dimension] = Field(min_length=1, description="job field path → choice/uniform/loguniform/randint")
    searcher: SearcherSpec = SearcherSpec()
    scheduler: AshaSpec = AshaSpec()
    trials: int = Field(ge=1, le=1000, description="how many configs to sample and train")
    metric: Literal[SWEEP_METRICS] = "val_top1"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int | None = Field(default=None, ge=1,
                                              description="default: as many as the cluster holds with every worker")
    tracking: TrackingSpec = TrackingSpec()
    max_runtime: Duration | None = MAX_RUNTIME

    @property
    def base_job(self) -> JobSpec:
        return parse_spec(JobSpec, self.job, "job")

    @property
    def max_epochs(self) -> int:
        return self.scheduler.max_epochs or self.base_job.optim.epochs

    @property
    def experiment(self) -> str:
        """The MLflow experiment of the parent run and of every trial's child run: by default the base job's,
        beside the job's own runs."""
        return self.tracking.experiment or self.base_job.run_names[0]

    def trial_data(self, config: dict[str, Any]) -> dict[str, Any]:
        """The base job's mapping with the values of one sampled config put in at their paths."""
        data = copy.deepcopy(self.job)
        for path, value in config.items():
            *sections, leaf = path.split(".")
            place = data
            for section in sections:
                if not isinstance(place.get(section), dict):  # absent, or null (an optional section left out)
                    place[section] = {}
                place = place[section]
            place[leaf] = value
        return data


# --- YAML --------------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus anchors, aliases, explicit tags, duplicate or unhashable keys, and nesting
    deeper than `MAX_SPEC_DEPTH`."""

    depth = 0  # collections open around the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.YAMLError(f"{where}: anchors and aliases (&name, *name) are not allowed; write the values out")
        collection = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        explicit = collection and not event.implicit or isinstance(event, yaml.ScalarEvent) and event.tag
        if explicit:
            raise yaml.YAMLError(f"{where}: tags ({event.tag}) are not allowed; write plain values")
        if not collection:
            return super().compose_node(parent, index)
        if self.depth >= MAX_SPEC_DEPTH:
            raise yaml.YAMLError(f"{where}: nested more than {MAX_SPEC_DEPTH} levels deep; a spec needs about ten")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: a key is a name, not a list or mapping")
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
    if path.is_dir():
        raise SpecError(source, ["a folder, not a spec file"])
    if size > MAX_SPEC_BYTES:
        raise SpecError(source, [f"the file is {size:,} bytes; specs are at most {MAX_SPEC_BYTES:,}"])
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(source, ["the file is not UTF-8 text"]) from None
    except OSError as error:
        raise SpecError(source, [f"cannot read the file: {error.strerror}"]) from None
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
    """Validate `data` as `model`, or raise `SpecError` with one line per problem: pydantic's, and the values
    it would have converted although no one means them (see `_misread`)."""
    misread = _misread(model, data, ())
    try:
        spec = model.model_validate(data)
    except ValidationError as error:
        shown = {_path(loc) for loc, _ in misread}
        problems = [_describe(problem, model) for problem in error.errors()
                    if not any(_path(problem["loc"]) == path or _path(problem["loc"]).startswith((f"{path}.", f"{path}["))
                               for path in shown)]
    except RecursionError:  # a value nested deeper than any spec, not read through `parse_yaml`
        raise SpecError(source, [f"nested more than {MAX_SPEC_DEPTH} levels deep; a spec needs about ten"]) from None
    else:
        problems = []
    problems = [f"{_path(loc)}: {message}" for loc, message in misread] + problems
    if problems:
        raise SpecError(source, problems)
    return spec


def load_job_spec(path: Path) -> JobSpec:
    """A job spec file → `JobSpec`. A relative `model.pretrained` is relative to the spec's folder."""
    return parse_spec(JobSpec, read_job_data(path), str(path))


def read_job_data(path: Path) -> dict[str, Any]:
    """A job spec file's mapping, its relative paths made absolute."""
    return _job_data(read_yaml(path), path.parent, str(path))


def _job_data(data: dict[str, Any], folder: Path, source: str) -> dict[str, Any]:
    """A job spec's mapping with a relative `model.pretrained` made absolute (from `folder`)."""
    pretrained = (data.get("model") or {}).get("pretrained") if isinstance(data.get("model"), dict) else None
    if isinstance(pretrained, str):
        weights = (folder / pretrained).expanduser().resolve()
        if not weights.is_file():
            raise SpecError(source, [f"model.pretrained: no weights file at {weights}"])
        data = {**data, "model": {**data["model"], "pretrained": str(weights)}}
    return data


def load_sweep_spec(path: Path) -> SweepSpec:
    """A sweep spec file → `SweepSpec`, its base job read (a path is relative to the sweep's folder) and
    checked, and every trial a valid job spec (see `check_sweep`)."""
    return check_sweep(parse_spec(SweepSpec, read_sweep_data(path), str(path)), str(path))


def read_sweep_data(path: Path) -> dict[str, Any]:
    """A sweep spec file's mapping, its base job read in (a path is relative to the sweep's folder)."""
    data = read_yaml(path)
    job = data.get("job")
    if isinstance(job, str):
        job_path = (path.parent / job).expanduser()
        try:
            job_data = read_yaml(job_path)
        except SpecError as error:
            raise SpecError(str(path), [f"job: {job_path}: {problem}" for problem in error.problems]) from None
        data = {**data, "job": _job_data(job_data, job_path.parent, f"{path}: job {job_path}")}
    elif isinstance(job, dict):
        data = {**data, "job": _job_data(job, path.parent, str(path))}
    return data


def load_sweep_spec_text(text: str, source: str) -> SweepSpec:
    """A sweep spec from YAML text (as `submit` stores it: the base job inline)."""
    return check_sweep(parse_spec(SweepSpec, parse_yaml(text, source), source), source)


def check_sweep(sweep: SweepSpec, source: str) -> SweepSpec:
    """Refuse a sweep whose base job is invalid, whose space names a field a trial cannot change, or
    whose range reaches a value no job accepts: each dimension is tried at its extremes alone, and
    all dimensions at their lows and at their highs together, as job specs."""
    try:
        base = sweep.base_job
    except SpecError as error:
        raise SpecError(source, [f"job.{problem}" for problem in error.problems]) from None
    problems = [f"space.{path}: {problem}" for path in sweep.space if (problem := _sweepable(path))]
    if problems:
        raise SpecError(source, problems)
    if sweep.max_epochs > base.optim.epochs:
        problems.append(f"scheduler.max_epochs: {sweep.max_epochs}, but the job trains {base.optim.epochs} epochs")
    if sweep.scheduler.grace_period > sweep.max_epochs:
        problems.append(f"scheduler.grace_period: {sweep.scheduler.grace_period} epochs, longer than the "
                        f"{sweep.max_epochs} a trial trains: no trial could be stopped early")
    if sweep.metric.startswith("ema_") and not base.optim.ema_decay:
        problems.append(f"metric: {sweep.metric} needs an EMA of weights; set job optim.ema_decay, or use "
                        f"{sweep.metric.removeprefix('ema_')}")
    trials = [{path: value} for path, dimension in sweep.space.items() for value in dimension.extremes()]
    trials += [{path: d.extremes()[0] for path, d in sweep.space.items()},
               {path: d.extremes()[-1] for path, d in sweep.space.items()}]
    seen: set[str] = set()
    for config in trials:
        try:
            parse_spec(JobSpec, sweep.trial_data(config), "trial")
        except SpecError as error:
            where = ", ".join(f"{path}={value!r}" for path, value in config.items())
            for problem in error.problems:
                if problem not in seen:
                    seen.add(problem)
                    problems.append(f"space: a trial with {where} is not a valid job: {problem}")
    if problems:
        raise SpecError(source, problems)
    return sweep


def _sweepable(path: str) -> str | None:
    """Why a trial cannot change the job field at `path`; None if it can."""
    if any(path == fixed or path.startswith(f"{fixed}.") for fixed in NOT_SWEPT):
        return "every trial keeps the base job's value (a trial's name, storage, tracking, data and resources are fixed)"
    models: list[type[BaseModel]] = [JobSpec]
    for depth, part in enumerate(parts := path.split(".")):
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            allowed = sorted({name for m in models for name in m.model_fields})
            where = ".".join(parts[:depth]) or "the top level"
            return f"no field {part!r} in {where}; fields there: {', '.join(allowed)}"
        models = [m for f in fields for m in _models_in(f.annotation)]
        if depth == len(parts) - 1 and models:
            return f"a section, not a value; sweep one of its fields: {', '.join(sorted(models[0].model_fields))}"
    return None


def load_job_spec_text(text: str, source: str) -> JobSpec:
    """A job spec from YAML text (as `submit` stores it: paths already absolute)."""
    return parse_spec(JobSpec, parse_yaml(text, source), source)


def dump_spec(spec: BaseModel) -> str:
    """The spec as YAML, every default included: what `compound job validate` prints."""
    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True), sort_keys=False, default_flow_style=False)


# --- error messages ----------------------------------------------------------------------------------

def _describe(problem: dict, root: type[BaseModel]) -> str:
    loc = problem["loc"]
    path = _path(loc)
    kind, message, value = problem["type"], problem["msg"].removeprefix("Value error, "), problem.get("input")
    if not loc:  # a check across sections: its message names the fields
        return message
    if kind == "invalid_key" or loc[-1] == "[key]":  # a key YAML read as a number, boolean or null
        where = _path(loc[:-2] if loc[-1] == "[key]" else loc[:-1]) or "the top level"
        if isinstance(value, bool):
            return (f"{where}: the key {str(value).lower()} is not a name; YAML reads unquoted yes/no/on/off/true/false "
                    "as booleans: quote it")
        return f"{where}: the key {_show(value)} is not a name: quote it, or remove it"
    if kind == "extra_forbidden":
        allowed = _fields_at(root, loc[:-1])
        return f"{path}: unknown field; allowed here: {', '.join(allowed)}" if allowed else f"{path}: unknown field"
    if kind == "missing":
        return f"{path}: required, but missing"
    if kind == "string_pattern_mismatch":
        return f"{path}: should be {_pattern_in_words(problem['ctx']['pattern'])} (got {_show(value)})"
    if kind == "string_type" and isinstance(value, bool):
        words = "yes, on and true" if value else "no, off and false"
        example = "yes" if value else "no"
        return f"{path}: should be text, but YAML reads unquoted {words} as {str(value).lower()}: quote it, e.g. '{example}'"
    if kind == "string_type" and isinstance(value, int | float):
        return f"{path}: should be text, not a number: quote it, e.g. '{value}' (got {_show(value)})"
    if kind == "value_error" and isinstance(value, dict):
        return f"{path}: {message}"
    return f"{path}: {message} (got {_show(value)})"


def _pattern_in_words(pattern: str) -> str:
    """What the specs' name and URL patterns allow, as a person says it."""
    name = re.fullmatch(r"\^\[([^\]]+)\]\[([^\]]+)\]\{0,(\d+)\}\$", pattern)
    if name:
        first, rest, more = name.groups()
        return (f"{_characters(rest)}, starting with {_characters(first, one=True)}, at most {int(more) + 1} "
                "characters")
    if pattern.startswith("^s3://"):
        words = "an S3 URL, s3://bucket/path" if "+/." in pattern else "an S3 URL, s3://bucket or s3://bucket/prefix"
        return words + (", ending in .json" if pattern.endswith(r"\.json$") else "")
    return f"text matching the pattern {pattern}"


def _characters(klass: str, *, one: bool = False) -> str:
    """A regex character class (`a-z0-9._-`) in words: what it allows, or `one` character of it."""
    ranges = {"a-z": ("lowercase letters", "a lowercase letter"), "A-Z": ("capital letters", "a capital letter"),
              "0-9": ("digits", "a digit")}
    words = []
    while klass:
        if klass[:3] in ranges:
            words.append(ranges[klass[:3]][one])
            klass = klass[3:]
        else:
            words.append(f"'{klass[0]}'")
            klass = klass[1:]
    last = "or" if one else "and"
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _path(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc
                   if part not in FORM_TAGS).lstrip(".")


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


def _misread(annotation: Any, value: Any, loc: tuple) -> list[tuple[tuple, str]]:
    """(path, problem) for each value below `value` that pydantic would convert although no one means it:
    true/false where a number belongs (YAML's yes/no/on/off too: pydantic reads them as 1 and 0), and an
    infinity or NaN where a number belongs. `annotation` is the type the value is validated as."""
    kinds = _leaves(annotation)
    if Any in kinds:
        return []
    if isinstance(value, dict):
        models = [kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)]
        tagged = [model for model in models if _tag(model) is not None and _tag(model) == value.get("name")]
        if tagged or models:
            fields = {field.alias or name: field for name, field in (tagged or models)[0].model_fields.items()}
            return [problem for key, item in value.items() if key in fields
                    for problem in _misread(fields[key].annotation, item, (*loc, key))]
        mappings = [typing.get_args(kind)[1] for kind in kinds if typing.get_origin(kind) is dict]
        return [problem for key, item in value.items() for problem in _misread(mappings[0], item, (*loc, key))] \
            if mappings else []
    if isinstance(value, list):
        for kind in kinds:
            origin, args = typing.get_origin(kind), typing.get_args(kind)
            if origin is list or origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                return [problem for index, item in enumerate(value) for problem in _misread(args[0], item, (*loc, index))]
            if origin is tuple:
                return [problem for index, (item, arg) in enumerate(zip(value, args, strict=False))
                        for problem in _misread(arg, item, (*loc, index))]
        return []
    numbers = {kind for kind in kinds if kind in (int, float)}
    numbers |= {type(option) for kind in kinds if typing.get_origin(kind) is Literal
                for option in typing.get_args(kind) if type(option) in (int, float)}
    if isinstance(value, bool):
        if numbers and bool not in kinds and str not in kinds:
            number = "a number" if float in numbers else "a whole number"
            return [(loc, f"should be {number}, not true or false (got {value})")]
        return []
    if numbers and str not in kinds and (isinstance(value, float) or float in numbers and isinstance(value, str)):
        try:
            finite = math.isfinite(float(value))
        except ValueError:
            return []
        if not finite:
            return [(loc, f"not a finite number (got {_show(value)})")]
    return []


def _leaves(annotation: Any) -> list[Any]:
    """The types an annotation allows, through Annotated, Optional and unions."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
